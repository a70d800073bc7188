"""Prefect tasks of the pipeline flow that are not another flow's: the run's hook points, whether
an existing fold is current, and the run's eval config. One lib.pipeline call each."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lib.pipeline.config import PipelineConfig
from lib.pipeline.run_record import claim_run
from lib.pipeline.steps import fold_inputs, mark_fold_inputs, plan_hooks, write_eval_config
from tasks.common import RETRY


@task(name="claim-run", task_run_name="claim-{label}", cache_policy=NO_CACHE, **RETRY)
def claim_run_task(cfg: PipelineConfig, label: str = "run") -> dict[str, Any]:
    """Refuse a config that differs from the one recorded under this run id; record it the first time."""
    return claim_run(cfg)


@task(name="plan-pipeline", task_run_name="plan-{label}", cache_policy=NO_CACHE, **RETRY)
def plan_pipeline_task(cfg: PipelineConfig, label: str = "pipeline") -> dict[str, Any]:
    """Hook points to capture, blocks to align, the student's local folder (reads only config.json files)."""
    return plan_hooks(cfg)


@task(name="fold-inputs", task_run_name="fold-inputs-{label}", cache_policy=NO_CACHE, **RETRY)
def fold_inputs_task(spec: str, student: str, output_dir: str, label: str = "fold", hf_home: str | None = None,
                     hf_hub_cache: str | None = None) -> dict[str, Any]:
    """Whether `output_dir` already holds a gated fold of exactly these inputs (then it is reused)."""
    return fold_inputs(spec, student, output_dir, hf_home, hf_hub_cache)


@task(name="mark-fold-inputs", task_run_name="mark-fold-{label}", cache_policy=NO_CACHE, **RETRY)
def mark_fold_task(output_dir: str, digest: str, label: str = "fold") -> None:
    mark_fold_inputs(output_dir, digest)


@task(name="eval-config", task_run_name="eval-config-{label}", cache_policy=NO_CACHE, **RETRY)
def eval_config_task(cfg: PipelineConfig, rotation_path: str | None, folded: str | None, label: str = "run") -> str:
    """Write the run's eval config (teacher vs baseline, rotated, folded); returns its path."""
    return str(write_eval_config(cfg, cfg.run_dir(), rotation_path, folded))
