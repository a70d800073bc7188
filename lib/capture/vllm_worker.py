"""The vLLM worker extension that captures activations inside vLLM's worker processes.

vLLM loads this class by its dotted path (`LLM(..., worker_extension_cls=
"lib.capture.vllm_worker.CaptureWorkerExtension")`) and mixes it into its worker class; the driver
(`lib/vllm_backend.py`) calls the `tourguide_*` methods with `LLM.collective_rpc`. It is not
meant to be used directly. What it does per forward step (one vLLM engine step, many
requests flattened into one token axis):

    pre-hook on the model   -> note req_ids (batch order), query_start_loc, positions, input_ids
    hooks on hook points    -> copy each tensor at once [num_tokens, d] (fused kernels reuse
                               buffers in place); decoder layers return (hidden, residual) and
                               the residual stream after the block is their sum
    hook on the final norm  -> keep its output (normed final residual) for logits, on every
                               tensor-parallel rank (the lm_head gather is a collective)
    post-hook on the model  -> split the flat rows per request by query_start_loc

`tourguide_drain` computes logits for every prompt position (final norm output -> vLLM's own
`compute_logits`, in chunks), writes one safetensors file per request into a folder the driver
chose and returns small JSON-able descriptions. Activation hooks run on tensor-parallel rank 0
only (the residual stream is replicated there); other ranks only help with logits and return
None. Data never travels through vLLM's RPC serializer (it would need pickle for tensors).

Only the V1 model runner is supported (it keeps the batch's `input_batch.req_ids`); the driver
forces it with VLLM_USE_V2_MODEL_RUNNER=0. The pure helpers (`split_rows`, `RequestRows`) are
tested without vLLM: `python -m pytest tests/vllm/test_vllm_units.py -q`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lib.core.dtypes import torch_dtype

_FINAL_NORM = "model.norm"  # vLLM's name of the final RMSNorm in Llama/Qwen2/Qwen3


_LOGITS_CHUNK = 1024  # rows per compute_logits call: T x V logits at once can be gigabytes


def flat_tensor(value: Any) -> torch.Tensor:
    """The tensor a hook saw: modules return a tensor, (out, bias) or (hidden, residual)."""
    return value[0] if isinstance(value, tuple | list) else value


def residual_stream(output: Any) -> torch.Tensor:
    """Residual stream after a vLLM decoder layer [T, d]: layers return (hidden, residual)
    with the last add deferred into the next layer's fused add+norm, so the stream is the sum
    (a new tensor, so it survives the in-place kernels that follow)."""
    if isinstance(output, tuple | list) and len(output) == 2 and output[1] is not None:
        return output[0] + output[1]
    return flat_tensor(output).clone()


def split_rows(query_start_loc: list[int], req_ids: list[str]) -> list[tuple[str, int, int]]:
    """(req_id, start, end) rows of each request in a flat step of tokens; empty spans dropped.

    `query_start_loc` has len(req_ids)+1 (or more: padded requests repeat the last offset).
    """
    if len(query_start_loc) < len(req_ids) + 1:
        raise RuntimeError(f"tourguide: query_start_loc has {len(query_start_loc)} entries for "
                           f"{len(req_ids)} requests; the batch layout is not what this vLLM was validated with")
    spans = []
    for i, rid in enumerate(req_ids):
        s, e = int(query_start_loc[i]), int(query_start_loc[i + 1])
        if e < s:
            raise RuntimeError(f"tourguide: query_start_loc is not increasing at request {i}: {query_start_loc}")
        if e > s and rid is not None:
            spans.append((rid, s, e))
    return spans


@dataclass
class RequestRows:
    """The rows one request contributed across steps, stitched by position.

    A chunked prefill arrives as several chunks; a preempted request that vLLM recomputes
    starts again at an earlier position, and its newer rows replace the older ones.
    """

    chunks: int = 0  # pieces appended (> 1: chunked prefill or recomputation)
    positions: list[torch.Tensor] = field(default_factory=list)  # [n] int64 each
    input_ids: list[torch.Tensor] = field(default_factory=list)  # [n] int64 each
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> [n, d] each

    def n_rows(self) -> int:
        return sum(len(p) for p in self.positions)

    def append(self, positions: torch.Tensor, input_ids: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        start = int(positions[0]) if len(positions) else 0
        if self.positions and start < self.n_rows():
            self.truncate(start)  # recomputation after preemption: drop the superseded rows
        self.chunks += 1
        self.positions.append(positions)
        self.input_ids.append(input_ids)
        for name, t in tensors.items():
            self.tensors.setdefault(name, []).append(t)

    def truncate(self, n: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # rows may still be in flight to pinned host memory (_to_host)
        pos, ids = torch.cat(self.positions), torch.cat(self.input_ids)
        keep = int((pos < n).sum())
        self.positions, self.input_ids = [pos[:keep]], [ids[:keep]]
        self.tensors = {k: [torch.cat(v)[:keep]] for k, v in self.tensors.items()}

    def stacked(self) -> dict[str, torch.Tensor]:
        out = {"positions": torch.cat(self.positions), "input_ids": torch.cat(self.input_ids)}
        out.update({k: torch.cat(v) for k, v in self.tensors.items()})
        return out


@dataclass
class _Step:
    spans: list[tuple[str, int, int]]
    positions: torch.Tensor  # [num_tokens] int64, CPU
    input_ids: torch.Tensor  # [num_tokens] int64, CPU
    bufs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _CaptureState:
    hook_points: tuple[str, ...]
    logits: bool
    store_dtype: torch.dtype
    rank: int
    handles: list[Any] = field(default_factory=list)
    step: _Step | None = None
    requests: dict[str, RequestRows] = field(default_factory=dict)
    steps: int = 0
    fired: dict[str, int] = field(default_factory=dict)  # hook point -> steps in which it fired


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Copy to CPU; on CUDA into pinned memory without blocking (drain synchronises once)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _query_start_loc() -> list[int] | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if meta is None:
        return None
    if isinstance(meta, list):
        raise RuntimeError("tourguide: micro-batched forward (dual batch overlap) is not supported by the "
                           "vLLM capture backend; turn it off")
    for m in meta.values():
        qsl = getattr(m, "query_start_loc_cpu", None)
        if qsl is None:
            qsl = getattr(m, "query_start_loc", None)
        if qsl is not None:
            return [int(x) for x in qsl.tolist()]
    return None


class CaptureWorkerExtension:
    """Mixed into vLLM's worker class; every public name starts with `tourguide_` so it cannot
    clash with the worker's own attributes (vLLM asserts there is no clash)."""

    def tourguide_arm(self, hook_points: list[str], logits: bool, store_dtype: str) -> dict[str, Any]:
        """(Re)install the hooks for `hook_points` and forget earlier captures.

        Returns {"rank", "runner", "model"} for the driver's messages. Raises RuntimeError
        naming the reason when this worker cannot capture (unknown module, V2 runner, PP).
        """
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        self.tourguide_disarm()
        runner = self.model_runner  # type: ignore[attr-defined]
        if not hasattr(getattr(runner, "input_batch", None), "req_ids"):
            raise RuntimeError(
                f"tourguide: vLLM model runner {type(runner).__name__} keeps no input_batch.req_ids, so the "
                "flat batch cannot be split per request; the capture backend needs the V1 model runner "
                "(unset VLLM_USE_V2_MODEL_RUNNER or set it to 0)")
        if get_pp_group().world_size > 1:
            raise RuntimeError("tourguide: pipeline parallelism is not supported by the vLLM capture backend; "
                               "use tensor parallelism only")
        model = runner.get_model()
        modules = dict(model.named_modules())
        rank = get_tensor_model_parallel_rank()
        state = _CaptureState(tuple(hook_points), bool(logits), torch_dtype(store_dtype), rank)
        self._tourguide_state = state
        wanted = list(hook_points) if rank == 0 else []
        missing = [h for h in wanted if h.removesuffix(":input") not in modules]
        if logits and _FINAL_NORM not in modules:
            missing.append(_FINAL_NORM)
        if missing:
            blocks = sorted(n for n in modules if n.count(".") == 2 and n.startswith("model.layers."))[:3]
            raise RuntimeError(f"tourguide: vLLM's {type(model).__name__} has no module(s) {missing} "
                               f"(its decoder blocks are named like {blocks})")

        def pre_model(_mod: Any, args: tuple, kwargs: dict) -> None:
            qsl = _query_start_loc()
            req_ids = list(runner.input_batch.req_ids)
            if qsl is None or not req_ids:
                state.step = None  # a dummy/profiling run, not one of ours
                return
            positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if positions is None or input_ids is None:
                raise RuntimeError("tourguide: the model was called without input_ids/positions (prompt "
                                   "embeddings?); the capture backend needs token-id prompts")
            if positions.dim() > 1:  # M-RoPE style [3, T]: the text position is the first row
                positions = positions[0]
            state.step = _Step(split_rows(qsl, req_ids), positions.to("cpu", torch.long, copy=True),
                               input_ids.to("cpu", torch.long, copy=True))

        def post_model(_mod: Any, _args: tuple, _kwargs: dict, _out: Any) -> None:
            step, state.step = state.step, None
            if step is None:
                return
            state.steps += 1
            for name in step.bufs:
                state.fired[name] = state.fired.get(name, 0) + 1
            host = {name: _to_host(t) for name, t in step.bufs.items()}
            for rid, s, e in step.spans:
                rows = state.requests.setdefault(rid, RequestRows())
                rows.append(step.positions[s:e], step.input_ids[s:e], {k: v[s:e] for k, v in host.items()})

        def keep(name: str, t: torch.Tensor, dtype: torch.dtype, fresh: bool = False) -> None:
            if state.step is not None:
                # A copy unless `t` is already our own new tensor: vLLM's fused add+norm rewrites
                # the layers' buffers in place later in the forward.
                state.step.bufs[name] = t.detach().to(dtype=dtype, copy=not fresh)

        handles = [model.register_forward_pre_hook(pre_model, with_kwargs=True),
                   model.register_forward_hook(post_model, with_kwargs=True)]
        for h in wanted:
            module = modules[h.removesuffix(":input")]
            if h.endswith(":input"):
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, n=h: keep(n, flat_tensor(args), state.store_dtype)))
            elif _is_block(h):
                handles.append(module.register_forward_hook(
                    lambda m, args, out, n=h: keep(n, residual_stream(out), state.store_dtype, fresh=True)))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, n=h: keep(n, flat_tensor(out), state.store_dtype)))
        if logits:
            # The normed final residual, kept in the compute dtype: logits are computed from it
            # at drain time exactly as vLLM would (lm_head + logits processor), then cast.
            handles.append(modules[_FINAL_NORM].register_forward_hook(
                lambda m, args, out: keep("__normed__", flat_tensor(out), flat_tensor(out).dtype)))
        state.handles = handles
        return {"rank": rank, "runner": type(runner).__name__, "model": type(model).__name__,
                "pid": os.getpid()}

    def tourguide_drain(self, out_dir: str) -> dict[str, Any] | None:
        """Write each captured request to `out_dir/req_XXXXX.safetensors` and forget it.

        Tensors per file: positions [n] int64, input_ids [n] int64, act/<hook> [n, d] in the store
        dtype, logits [n, V] in the store dtype (when armed with logits). Returns (rank 0)
        {"requests": [{"request_id", "file", "n_rows", "chunks"}], "steps", "fired"}; other ranks None.
        Every rank must run it: the logits gather across tensor-parallel ranks is a collective.
        """
        from lib.store.safetensors_io import save_tensors

        state: _CaptureState | None = getattr(self, "_tourguide_state", None)
        if state is None:
            raise RuntimeError("tourguide: drain called before arm")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device->host copies of the last step
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        out: list[dict[str, Any]] = []
        # Same order on every rank (sorted ids), so the collective gathers pair up.
        for k, rid in enumerate(sorted(state.requests)):
            rows = state.requests[rid]
            tensors = rows.stacked()
            normed = tensors.pop("__normed__", None)
            if state.logits:
                if normed is None:
                    raise RuntimeError(f"tourguide: request {rid}: the final norm ({_FINAL_NORM}) never fired, "
                                       "so there are no logits")
                chunks = []
                with torch.inference_mode():
                    for i in range(0, len(normed), _LOGITS_CHUNK):
                        lg = model.compute_logits(normed[i : i + _LOGITS_CHUNK].to(device))
                        if lg is not None:
                            chunks.append(lg.to("cpu", state.store_dtype))
                if state.rank == 0:
                    tensors["logits"] = torch.cat(chunks)
            if state.rank == 0:
                path = os.path.join(out_dir, f"req_{k:05d}.safetensors")
                named = {("act/" + n if n not in ("positions", "input_ids", "logits") else n): t.contiguous()
                         for n, t in tensors.items()}
                save_tensors(path, named, durable=False)  # a spool the driver reads at once: no fsync
                out.append({"request_id": rid, "file": path, "n_rows": int(len(tensors["positions"])),
                            "chunks": rows.chunks})
        result = {"requests": out, "steps": state.steps, "fired": dict(state.fired)}
        state.requests.clear()
        state.steps = 0
        state.fired = {}
        return result if state.rank == 0 else None

    def tourguide_disarm(self) -> None:
        """Remove every hook this extension installed (idempotent)."""
        state: _CaptureState | None = getattr(self, "_tourguide_state", None)
        if state is not None:
            for h in state.handles:
                h.remove()
            state.handles = []
        self._tourguide_state = None


def _is_block(hook_point: str) -> bool:
    """'model.layers.3' (a decoder block), not 'model.layers.3.mlp'."""
    head, _, last = hook_point.rpartition(".")
    return last.isdigit() and head.endswith("layers")
