"""The capture flow: plan → one cached task per batch → recompute what is missing → validate.

Run it: `tourguide capture --model ./my-model --output-dir runs/x/activations/student`
(or `python -m flows capture …`). Without a server, Prefect starts a throwaway local API.

With `partitions` N > 1 the flow plans once and runs each partition (whole batches, balanced by
tokens: lib.capture.partition) as a child run of this same flow with `partition=i`: concurrent
`capture/gpu` deployment runs when deployments are wanted (flows.placement), each with its own
idempotency key, else in-process subflows one after another. Every child re-plans (cheap,
deterministic), captures its slice into the shared output folder (the index is safe for
concurrent writers) and resumes on its own; the parent then checks and validates the whole index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.hooks import cancel_children, log_failure
from flows.placement import AUTO, UseDeployments, deployments_wanted, run_children
from lib.capture.spec import CaptureSpec
from lib.core.errors import ChecksumError
from lib.core.progress import stage
from tasks.capture import capture_batch, missing_items_task, plan_capture_task
from tasks.names import capture_run_name, model_slug, path_key
from tasks.validate import validate_shards


def _label(model: str, batch: list[dict[str, Any]]) -> str:
    first = batch[0]["sample_index"]
    return f"{model_slug(model)}-s{first:04d}" + (f"+{len(batch) - 1}" if len(batch) > 1 else "")


@flow(name="capture", flow_run_name=capture_run_name, log_prints=False, on_failure=[log_failure],
      on_cancellation=[cancel_children])
def capture_flow(model: str, output_dir: str = "activations", texts: list[str] | None = None,
                 text_files: list[str] | None = None, layers: list[str] | None = None, dtype: str = "float32",
                 compute_dtype: str | None = None, device: str = "auto", max_length: int | None = None,
                 batch_size: int = 8, logits: bool = True, backend: str = "torch", revision: str | None = None,
                 hf_home: str | None = None, hf_hub_cache: str | None = None, limit: int | None = None,
                 samples_dir: str | None = None, vllm_options: dict[str, Any] | None = None,
                 trust_remote_code: bool = False, progress: bool = False, partitions: int = 1,
                 partition: int | None = None, use_deployments: UseDeployments = AUTO) -> dict[str, Any]:
    """Capture activations of `model` over the texts into `output_dir` (shards + metadata.jsonl).

    `partitions` > 1 splits the work into child runs (see the module doc); `partition` = i makes
    this run the child that captures partition i only.
    Returns {"index", "n_samples", "n_computed", "n_reused", "config_digest", "hook_points"}.
    """
    params = dict(locals())  # first statement: exactly this run's parameters, handed on to partition children
    log = get_run_logger()
    spec = CaptureSpec(model=model, revision=revision, dtype=dtype, compute_dtype=compute_dtype, device=device,
                       hook_points=tuple(layers or ()), max_length=max_length, logits=logits, batch_size=batch_size,
                       backend=backend, hf_home=hf_home, hf_hub_cache=hf_hub_cache, vllm_options=vllm_options or {},
                       trust_remote_code=trust_remote_code)
    spec_d = spec.model_dump(mode="json")
    plan = plan_capture_task(spec_d, output_dir, texts, text_files, samples_dir, limit, label=model_slug(model),
                             partitions=partitions)
    out = Path(plan["output_dir"])
    hooks, digest = plan["hook_points"], plan["config_digest"]
    mine = plan["batches"] if partition is None else [plan["batches"][b] for b in plan["partitions"][partition]]
    batches_d = [[plan["items"][i] for i in batch] for batch in mine]
    items = [it for batch in batches_d for it in batch]
    # One hashing pass up front: the samples whose shard is absent, gone or corrupt. A cache hit
    # only proves that a batch ran once, so a batch holding such a sample bypasses the cache;
    # inside it, samples that still have a valid shard are not recomputed.
    pending = missing_items_task(items, str(out), label=model_slug(model))
    if partition is None and partitions > 1:
        child = {**params, "progress": False, "use_deployments": False}
        run_children(capture_flow, "capture/gpu", child, [i for i, p in enumerate(plan["partitions"]) if p],
                     remote=deployments_wanted(use_deployments))
    else:
        key = path_key("capture-progress", output_dir, model_slug(model)) + ("" if partition is None else f"-p{partition}")
        _capture(spec_d, model, batches_d, {it["capture_key"] for it in pending}, hooks, digest, out, progress, key)
    absent = missing_items_task(items, str(out), label=model_slug(model), verify=False)
    if absent:
        raise ChecksumError(f"{len(absent)} sample(s) have no index row in {out} after capturing: "
                            f"{[m['sample_id'] for m in absent][:10]}; re-run the same command")
    if partition is None:  # a partition child leaves the whole index's validation to its parent
        validate_shards([str(out / "metadata.jsonl")], label=model_slug(model))
    manifest = {"index": str(out / "metadata.jsonl"), "n_samples": len(items), "n_computed": len(pending),
                "n_reused": len(items) - len(pending), "config_digest": digest, "hook_points": hooks}
    log.info("captured %s: %d sample(s), %d computed, %d reused", model, len(items), manifest["n_computed"], manifest["n_reused"])
    return manifest


def _capture(spec_d: dict[str, Any], model: str, batches_d: list[list[dict[str, Any]]], pending_keys: set[str],
             hooks: list[str], digest: str, out: Path, progress: bool, artifact_key: str) -> None:
    """One cached task per batch, with a progress artifact and a console stage (lib.core.progress:
    the console decides whether it shows; `progress` is kept for callers of the flow)."""
    artifact = create_progress_artifact(progress=0.0, key=artifact_key, description=f"capture {model} → {out}")
    with stage(f"capture {model_slug(model)}", total=sum(map(len, batches_d)), unit="samples") as bar:
        for i, batch in enumerate(batches_d):
            stale = any(it["capture_key"] in pending_keys for it in batch)
            run_batch = capture_batch.with_options(refresh_cache=True) if stale else capture_batch
            run_batch(spec_d, batch, hooks, digest, str(out), label=_label(model, batch))
            bar.advance(len(batch))
            update_progress_artifact(artifact, progress=100.0 * (i + 1) / max(len(batches_d), 1))
