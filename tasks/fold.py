"""Prefect tasks of the fold: validate the spec → transform + write → equivalence gate.

Each is one lib call with paths and small JSON-able manifests in and out (tensors never cross a
task boundary: the write and gate stages rebuild the transforms from the spec file). Retries
apply to transient I/O only (tasks.common.RETRY); bad specs and a failed gate fail at once.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lib.fold.checkpoint import fold_from_spec, prepare_fold
from lib.fold.gate import GateOptions, format_gate
from lib.fold.gate_record import gate_failure, gate_from_spec
from lib.fold.options import FoldOptions
from tasks.common import RETRY, gpu_slot
from tasks.names import path_key


@task(name="fold-validate", task_run_name="fold-validate-{label}", cache_policy=NO_CACHE, **RETRY)
def validate_fold_spec(checkpoint: str, spec: str, output_dir: str, options: dict[str, Any], allow_inexact: bool = False,
                       allow_outside_paths: bool = False, revision: str | None = None, hf_home: str | None = None,
                       hf_hub_cache: str | None = None, label: str = "fold") -> dict[str, Any]:
    """Resolve the checkpoint and validate the spec against it; writes nothing. Returns the plan."""
    plan = prepare_fold(checkpoint, spec, output_dir, FoldOptions.model_validate(options), allow_inexact=allow_inexact,
                        allow_outside_paths=allow_outside_paths, revision=revision, hf_home=hf_home,
                        hf_hub_cache=hf_hub_cache)
    log = get_run_logger()
    log.info("spec %s validated for %s: exact=%s, %s", spec, plan["source_dir"], plan["exact"], plan["transforms"])
    for why in plan["inexact_reasons"]:
        log.warning("not exact (folded because --allow-inexact): %s", why)
    return plan


@task(name="fold-write", task_run_name="fold-write-{label}", cache_policy=NO_CACHE, **RETRY)
def write_folded_checkpoint(source_dir: str, spec: str, output_dir: str, options: dict[str, Any],
                            allow_inexact: bool = False, allow_outside_paths: bool = False,
                            label: str = "fold") -> dict[str, Any]:
    """Stream the source through the transforms into sharded safetensors (temp folder + rename)."""
    with gpu_slot():
        result = fold_from_spec(source_dir, output_dir, spec, FoldOptions.model_validate(options),
                                allow_inexact=allow_inexact, allow_outside_paths=allow_outside_paths)
    get_run_logger().info("wrote %s: %d tensors (%d transformed), %d shard(s), %.1f MB in %.1f s", result.output_dir,
                          result.n_tensors, result.n_transformed, len(result.shards), result.bytes_written / 1e6,
                          result.seconds)
    return result.model_dump(mode="json")


@task(name="fold-gate", task_run_name="fold-gate-{label}", cache_policy=NO_CACHE, **RETRY)
def gate_folded_checkpoint(source_dir: str, output_dir: str, spec: str, gate_options: dict[str, Any],
                           allow_inexact: bool = False, allow_outside_paths: bool = False,
                           source_ref: str | None = None, label: str = "fold") -> dict[str, Any]:
    """Reload the output, compare with the source in fp32, record the report/ledger, post the
    figures as a markdown artifact; raise GateFailedError when an exact fold fails."""
    with gpu_slot():
        result = gate_from_spec(source_dir, output_dir, spec, GateOptions.model_validate(gate_options),
                                allow_inexact=allow_inexact, allow_outside_paths=allow_outside_paths,
                                source_ref=source_ref, raise_on_failure=False)
    markdown = format_gate(result, title=f"Fold gate for {output_dir}")
    create_markdown_artifact(markdown=markdown, key=path_key("fold-gate", output_dir, label),
                             description=f"equivalence gate of {output_dir}")
    log = get_run_logger()
    (log.info if result.status == "passed" else log.warning)("gate %s: %s", result.status, result.failures or "ok")
    if result.status == "failed":
        raise gate_failure(output_dir, result, source_ref or source_dir)
    return {**result.model_dump(mode="json"), "markdown": markdown}
