"""Capture activations of a HF causal LM into the shard store (torch backend).

The plan (tokenize, spans, capture keys) is cheap and needs no weights; `capture_items` does
the batched forward with right padding + explicit attention mask, copies each hook point's
tensor inside the hook, drops pad positions and commits one shard per sample. Run it:

    tourguide capture --model runs/x/checkpoints/student --output-dir runs/x/activations/student
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lib.capture.plan import CapturePlan, PlanItem, batches_by_length, pending_items, plan_capture, valid_keys
from lib.capture.spec import CAPTURE_VERSION, CaptureSpec
from lib.capture.torch_backend import forward_batch, get_model
from lib.capture.writer import ShardWriter
from lib.core.errors import BadInputError
from lib.store.corpus import Sample
from lib.store.shards import (
    INDEX_NAME,
    LAYER_CONVENTION,
    ShardRecord,
    commit_shards,
    make_payload_record,
    shard_parts,
)
from lib.store.staging import check_output_dir


def shard_metadata(spec: CaptureSpec, plan: CapturePlan, item: PlanItem) -> dict[str, str]:
    return {
        "sample_id": item.sample_id, "text": item.text, "text_sha256": item.text_sha256,
        "model": spec.model, "revision": plan.model.revision, "tokenizer": plan.tokenizer,
        "dtype": spec.dtype, "layer_convention": LAYER_CONVENTION, "backend": spec.backend,
        "capture_key": item.capture_key, "capture_version": CAPTURE_VERSION,
        "truncated": str(item.truncated).lower(), "compute_dtype": plan.numerics["compute_dtype"],
        "device": plan.numerics["device"],
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
        extra={"compute_dtype": plan.numerics["compute_dtype"], "device": plan.numerics["device"]},
    )
    return make_payload_record(fields, payload), payload


def forward_items(spec: CaptureSpec, plan: CapturePlan, items: list[PlanItem]) -> list[dict[str, Any]]:
    """One batch through the backend: per sample {input_ids, logits?, act/<hook>} (CPU tensors)."""
    if spec.backend == "vllm":
        from lib.capture.vllm_backend import forward_batch_vllm

        return forward_batch_vllm(spec, plan, items)
    lm = get_model(spec, plan)
    return forward_batch(lm, plan.hook_points, [it.token_ids for it in items], spec.logits, spec.dtype)


def commit_items(spec: CaptureSpec, plan: CapturePlan, items: list[PlanItem], per_sample: list[dict[str, Any]],
                 out: Path) -> list[dict[str, Any]]:
    """Serialise + hash the batch's shards, write them durably, then append their rows."""
    built = [build_record(spec, plan, it, t) for it, t in zip(items, per_sample, strict=True)]
    commit_shards(out, built)  # looked up at call time: tests wrap it to time or fail commits
    return [r.model_dump() for r, _ in built]


def _not_yet_indexed(out: Path, items: list[PlanItem]) -> list[PlanItem]:
    """Drop items another writer (process, or an earlier attempt) already committed validly.

    Only an optimisation (commit_shards re-checks under the lock), so an index caught mid-append
    by this unlocked read is taken as "nothing known" rather than an error.
    """
    try:
        done = valid_keys(out, {it.capture_key for it in items})
    except BadInputError:
        return items
    return [it for it in items if it.capture_key not in done]


def capture_items(spec: CaptureSpec, plan: CapturePlan, items: list[PlanItem], out_dir: str | os.PathLike,
                  writer: ShardWriter | None = None) -> list[dict[str, Any]]:
    """Forward `items` as one batch, write their shards and index rows; return the rows (dicts).

    Rows already indexed by another writer with a valid shard are not written again. With a
    `writer`, the write is handed off (returns [] at once; the rows arrive in `writer.rows`).
    """
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = _not_yet_indexed(out, items)  # items another run already committed are not recomputed
    if not items:
        return []
    per_sample = forward_items(spec, plan, items)
    if writer is None:
        return commit_items(spec, plan, items, per_sample, out)
    writer.submit(lambda: commit_items(spec, plan, items, per_sample, out), [it.shard for it in items])
    return []


def run_capture(spec: CaptureSpec, samples: list[Sample], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Capture without Prefect (tests, notebooks): plan, skip valid shards, forward the rest.

    Batch k's shards are written on a background thread while batch k+1 computes (ShardWriter:
    rows in batch order, at most 2 batches in flight, a write failure re-raised here).
    Returns the same manifest as the capture flow: index path and counts.
    """
    out = check_output_dir(out_dir)
    plan = plan_capture(spec, samples)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending_items(plan, out)  # commit_shards replaces the stale rows of these
    with ShardWriter() as writer:
        for batch in batches_by_length(todo, spec.batch_size):
            capture_items(spec, plan, batch, out, writer)
    return {"index": str(out / INDEX_NAME), "n_samples": len(plan.items), "n_computed": len(todo),
            "n_reused": len(plan.items) - len(todo), "config_digest": plan.config_digest,
            "hook_points": list(plan.hook_points)}
