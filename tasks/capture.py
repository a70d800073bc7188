"""Capture tasks: plan (no weights), one batch forward + commit (cached across runs), and the
check of which samples lack a valid shard."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from lib.capture.plan import PlanItem, plan_from_items, prepare_capture, valid_keys
from lib.capture.run import capture_items
from lib.capture.spec import CAPTURE_VERSION, CaptureSpec
from tasks.common import RETRY, gpu_slot
from tasks.names import model_slug


@task(name="plan-capture", task_run_name="plan-{label}", retries=0)
def plan_capture_task(spec: dict[str, Any], output_dir: str, texts: list[str] | None = None,
                      text_files: list[str] | None = None, samples_dir: str | None = None,
                      limit: int | None = None, label: str = "capture", partitions: int = 1) -> dict[str, Any]:
    """Check and create the output folder, load the texts, tokenize and lay out capture keys,
    batches and partitions (no weights). Returns lib.capture.plan.prepare_capture's manifest."""
    return prepare_capture(CaptureSpec.model_validate(spec), output_dir, texts, text_files, samples_dir, limit,
                           partitions)


def batch_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Readable cross-run key: capture version, model, output folder and the batch's capture keys
    (which already hash text sha256, model revision, hook points, dtype, max_length, backend)."""
    keys = sorted(it["capture_key"] for it in parameters["items"])
    digest = hashlib.sha256("\n".join([parameters["output_dir"], *keys]).encode()).hexdigest()[:24]
    return f"capture-v{CAPTURE_VERSION}-{model_slug(parameters['spec']['model'])}-{len(keys)}x-{digest}"


@task(name="capture-batch", task_run_name="capture-{label}", cache_key_fn=batch_cache_key,
      persist_result=True, result_serializer="json", **RETRY)
def capture_batch(spec: dict[str, Any], items: list[dict[str, Any]], hook_points: list[str], config_digest: str,
                  output_dir: str, label: str = "batch") -> list[dict[str, Any]]:
    """Forward one batch and commit its shards + index rows. Returns the rows written (dicts).

    A cache hit proves only that this batch ran once: the flow re-checks the shards on disk.
    """
    cs = CaptureSpec.model_validate(spec)
    plan_items = [PlanItem(**{**it, "token_ids": tuple(it["token_ids"])}) for it in items]
    plan = plan_from_items(cs, plan_items, tuple(hook_points), config_digest)
    with gpu_slot():
        return capture_items(cs, plan, plan_items, output_dir)


@task(name="check-capture", task_run_name="check-{label}", retries=0)
def missing_items_task(items: list[dict[str, Any]], output_dir: str, label: str = "capture",
                       verify: bool = True) -> list[dict[str, Any]]:
    """The plan items that lack a valid (indexed, checksummed) shard in `output_dir`;
    `verify=False` only asks whether each is indexed (no hashing)."""
    ok = valid_keys(Path(output_dir), {it["capture_key"] for it in items}, verify=verify)
    return [it for it in items if it["capture_key"] not in ok]
