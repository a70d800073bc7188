"""The torch capture backend: one right-padded batch through `from_pretrained`'s model.

Hooks copy each hook point's tensor at once (to CPU, in the store dtype); pad positions are
dropped before anything is stored. The model is loaded once per process and kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lib.capture.plan import CapturePlan
from lib.capture.spec import CaptureSpec, HookPoint
from lib.core.dtypes import torch_dtype
from lib.core.errors import BadInputError
from lib.models.adapters import adapter_for_config
from lib.models.loading import ModelRef, load_model, load_tokenizer, pick_device
from lib.store.shards import (
    ACT_PREFIX,
)


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
