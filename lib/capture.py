"""Capture activations of a HF causal LM into the shard store (torch backend).

The plan (tokenize, spans, capture keys) is cheap and needs no weights; `capture_items` does
the batched forward with right padding + explicit attention mask, copies each hook point's
tensor inside the hook, drops pad positions and commits one shard per sample. Run it:

    tourguide capture --model runs/x/checkpoints/student --output-dir runs/x/activations/student
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lib.adapters import adapter_for_config
from lib.corpus import Sample
from lib.digests import sha256_json
from lib.errors import BadInputError
from lib.models import DTYPES, ModelRef, load_model, load_tokenizer, pick_device, read_config, resolve_model, torch_dtype
from lib.shards import (ACT_PREFIX, INDEX_NAME, INPUT_SUFFIX, LAYER_CONVENTION, ShardRecord, commit_shards,
                        make_payload_record, read_index, shard_name, shard_parts, verify_record)

CAPTURE_VERSION = "1"  # bump when shard contents change for the same inputs
FORWARD_BATCHES = 0  # forward passes run in this process (tests assert cache hits run none)
BACKENDS = ("torch", "vllm")


@dataclass(frozen=True)
class CaptureSpec:
    """Everything that decides the bytes of a shard (and so its capture key), plus run options."""

    model: str
    revision: str | None = None
    dtype: str = "float32"  # stored dtype
    compute_dtype: str | None = None  # None = same as dtype; 'float32' on CPU for bf16 stores
    device: str = "auto"
    hook_points: tuple[str, ...] = ()  # () = every decoder block
    max_length: int | None = None
    logits: bool = True
    batch_size: int = 8
    backend: str = "torch"
    hf_home: str | None = None
    hf_hub_cache: str | None = None
    trust_remote_code: bool = False
    vllm_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise BadInputError(f"--dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise BadInputError(f"--compute-dtype {self.compute_dtype!r} is not one of {list(DTYPES)}")
        if self.max_length is not None and self.max_length < 1:
            raise BadInputError(f"--max-length must be >= 1 token, got {self.max_length}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise BadInputError(f"--backend {self.backend!r} is not one of {list(BACKENDS)}")


@dataclass(frozen=True)
class HookPoint:
    """`name` as stored (act/<name>); `module` the module it hooks; `kind` 'output' or 'input'."""

    name: str
    module: str
    kind: str

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        if name.endswith(INPUT_SUFFIX):
            return cls(name, name[: -len(INPUT_SUFFIX)], "input")
        return cls(name, name, "output")


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


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--output-dir {out} is a file; pass a folder (it is created if missing)")
    return out


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


def plan_capture(spec: CaptureSpec, samples: list[Sample]) -> CapturePlan:
    """Tokenize, truncate, lay out token spans and capture keys. Loads no weights."""
    spec.check()
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
    return CapturePlan(model, spec.model, tuple(hooks), tuple(items), sha256_json(config_key))


def plan_from_items(spec: CaptureSpec, items: list[PlanItem], hook_points: tuple[str, ...], config_digest: str) -> CapturePlan:
    """Rebuild a (partial) plan from items planned earlier, e.g. in a worker task."""
    model = resolve_model(spec.model, spec.revision, spec.hf_home, spec.hf_hub_cache)
    return CapturePlan(model, spec.model, tuple(hook_points), tuple(items), config_digest)


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


# --- the torch backend ------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: Any
    adapter: Any
    device: str
    compute_dtype: str
    pad_id: int


@lru_cache(maxsize=2)
def _load_cached(local_dir: str, revision: str, compute_dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
    ref = ModelRef(local_dir, local_dir, revision, "")
    model = load_model(ref, compute_dtype, device, trust_remote_code)
    tok = load_tokenizer(ref, trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return LoadedModel(model, adapter_for_config(model.config), device, compute_dtype, int(pad))


def get_model(spec: CaptureSpec, plan: CapturePlan) -> LoadedModel:
    """Load (once per process) the plan's model in the compute dtype on the chosen device."""
    device = pick_device(spec.device)
    compute = spec.compute_dtype or spec.dtype
    if device == "cpu" and compute in ("bfloat16", "float16"):
        warnings.warn(
            f"computing in {compute} on CPU is ~10x slower than float32; pass --compute-dtype float32 "
            f"to compute in fp32 and store {spec.dtype}", stacklevel=2)
    assert plan.model.local_dir is not None
    return _load_cached(plan.model.local_dir, plan.model.revision, compute, device, spec.trust_remote_code)


def forward_batch(lm: LoadedModel, hooks: tuple[str, ...], seqs: list[tuple[int, ...]], logits: bool,
                  store_dtype: str) -> list[dict[str, Any]]:
    """Run one right-padded batch; return per sample {input_ids [T], logits [T,V]?, act/<h> [T,d]}.

    Pad positions are dropped before anything is stored. Hook outputs are copied at once (to
    CPU, in the store dtype), since later kernels may reuse the buffers.
    """
    import torch

    sdt = torch_dtype(store_dtype)
    lengths = [len(s) for s in seqs]
    bsz, width = len(seqs), max(lengths)
    ids = torch.full((bsz, width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    modules = dict(lm.model.named_modules())
    captured: dict[str, Any] = {}
    handles = []

    def save(name: str, value: Any) -> None:
        t = value[0] if isinstance(value, tuple | list) else value
        captured[name] = t.detach().to("cpu", sdt, copy=True)

    for h in hooks:
        hp = HookPoint.parse(h)
        mod = modules[hp.module]
        if hp.kind == "output":
            handles.append(mod.register_forward_hook(lambda m, a, out, n=h: save(n, out)))
        else:
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=h: save(n, a)))
    try:
        with torch.inference_mode():
            kw = dict(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            if logits:
                out_logits = lm.model(**kw).logits.to("cpu", sdt)
            else:
                lm.adapter.base_model(lm.model)(**kw)  # no lm_head at all when logits are off
                out_logits = None
    finally:
        for hd in handles:
            hd.remove()
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise BadInputError(f"hook point(s) {missing} never fired during the forward pass; they are not on the decoder path")
    results = []
    for b, n in enumerate(lengths):
        tensors = {"input_ids": ids[b, :n].clone()}
        if out_logits is not None:
            tensors["logits"] = out_logits[b, :n]
        for h in hooks:
            tensors[ACT_PREFIX + h] = captured[h][b, :n]
        results.append(tensors)
    return results


def shard_metadata(spec: CaptureSpec, plan: CapturePlan, item: PlanItem) -> dict[str, str]:
    return {
        "sample_id": item.sample_id, "text": item.text, "text_sha256": item.text_sha256,
        "model": spec.model, "revision": plan.model.revision, "tokenizer": plan.tokenizer,
        "dtype": spec.dtype, "layer_convention": LAYER_CONVENTION, "backend": spec.backend,
        "capture_key": item.capture_key, "capture_version": CAPTURE_VERSION,
        "truncated": str(item.truncated).lower(),
    }


def build_record(spec: CaptureSpec, plan: CapturePlan, item: PlanItem, tensors: dict[str, Any]) -> tuple[ShardRecord, list[Any]]:
    payload = shard_parts(tensors, shard_metadata(spec, plan, item))  # zero-copy buffers
    fields = dict(
        shard=item.shard, sample_id=item.sample_id, sample_index=item.sample_index, text_sha256=item.text_sha256,
        token_start=item.token_start, token_end=item.token_start + len(item.token_ids), n_tokens=len(item.token_ids),
        truncated=item.truncated, layers=list(plan.hook_points), dtype=spec.dtype,
        shapes={k: list(v.shape) for k, v in tensors.items()}, model=spec.model, revision=plan.model.revision,
        tokenizer=plan.tokenizer, backend=spec.backend, capture_key=item.capture_key,
        capture_version=CAPTURE_VERSION, logits=spec.logits,
    )
    return make_payload_record(fields, payload), payload


def capture_items(spec: CaptureSpec, plan: CapturePlan, items: list[PlanItem], out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Forward `items` as one batch, write their shards and index rows; return the rows (dicts).

    Rows already indexed by another writer with a valid shard are not written again.
    """
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Items another run (or a crashed earlier attempt) already committed are not recomputed.
    done = valid_keys(out, {it.capture_key for it in items})
    items = [it for it in items if it.capture_key not in done]
    if not items:
        return []
    global FORWARD_BATCHES
    FORWARD_BATCHES += 1
    if spec.backend == "vllm":
        from lib.vllm_backend import forward_batch_vllm

        per_sample = forward_batch_vllm(spec, plan, items)
    else:
        lm = get_model(spec, plan)
        per_sample = forward_batch(lm, plan.hook_points, [it.token_ids for it in items], spec.logits, spec.dtype)
    built = [build_record(spec, plan, it, t) for it, t in zip(items, per_sample, strict=True)]
    commit_shards(out, built)
    return [asdict(r) for r, _ in built]


def run_capture(spec: CaptureSpec, samples: list[Sample], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Capture without Prefect (tests, notebooks): plan, skip valid shards, forward the rest.

    Returns the same manifest as the capture flow: index path and counts.
    """
    out = check_output_dir(out_dir)
    plan = plan_capture(spec, samples)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending_items(plan, out)  # commit_shards replaces the stale rows of these
    for batch in batches_by_length(todo, spec.batch_size):
        capture_items(spec, plan, batch, out)
    return {"index": str(out / INDEX_NAME), "n_samples": len(plan.items), "n_computed": len(todo),
            "n_reused": len(plan.items) - len(todo), "config_digest": plan.config_digest,
            "hook_points": list(plan.hook_points)}
