"""The pipeline's typed config and the small decisions the pipeline flow asks of `lib`.

`PipelineConfig` is the pipeline flow's single parameter: the eval-config fields (teacher,
student, metrics, dtype, device, max_length, batch size, layers, limit) plus pipeline options
(permutations, position-0 exclusion, PCA, deployments). Prefect renders it as a form in the UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lib.core.fanout import DaskAddress, DaskWorkers, FanOut, check_fanout
from lib.core.options import Options, PathStr, Seq
from lib.qa.eval_config import Dtype, Metric, RunId, check_metric_list
from lib.qa.metric_names import METRICS


class PipelineConfig(Options):
    """One pipeline run: student vs teacher → transports → fold → gate → QA → report."""

    label = "pipeline config"

    run_id: RunId = Field("demo", description="run folder name under runs_root")
    runs_root: PathStr = Field("runs", description="where run folders live")
    teacher: PathStr = Field(..., description="teacher checkpoint: local folder or cached hub id")
    student: PathStr = Field(..., description="student checkpoint: local folder or cached hub id")
    hf_home: PathStr | None = Field(None, description="HF_HOME whose hub cache holds hub ids (its hub/ folder)")
    hf_hub_cache: PathStr | None = Field(None, description="HF hub cache folder holding hub ids (overrides hf_home)")
    metrics: Seq[Metric] = Field(METRICS, description="QA metrics to compute")
    dtype: Dtype = Field("float32", description="capture dtype (what the shards store; the fold keeps the "
                                                "checkpoint's own dtype)")
    compute_dtype: Dtype | None = Field(None, description="dtype of the capture forward passes (default: dtype); "
                                                          "bfloat16 on a GPU, never on a CPU (~10x slower there)")
    device: str = Field("auto", description="cpu, cuda, … (auto: cuda when available)")
    max_length: int | None = Field(64, ge=1, description="tokens per sample (truncation recorded)")
    batch_size: int = Field(8, ge=1, description="samples per forward pass")
    limit: int | None = Field(None, ge=1, description="use only the first N blurbs of the corpus (smoke runs)")
    layers: Seq[str] = Field((), description="decoder blocks to align (default: all)")
    solve_permutations: bool = Field(True, description="also solve GQA head and MLP neuron permutations (not with "
                                                       "pca_dim: nothing is folded then)")
    exclude_position0: bool = Field(False, description="leave position-0 (attention-sink) tokens out of the statistics")
    pca_dim: int | None = Field(None, ge=1, description="PCA dimension when hidden sizes differ")
    partitions: int = Field(1, ge=1, description="capture partitions per model: each a child run (concurrent "
                                                 "`capture/gpu` runs with deployments)")
    use_deployments: bool | Literal["auto"] = Field(
        "auto", description="run capture (QA's too) and fold as `gpu` deployments (run_deployment); auto: when this "
                            "run was started from a deployment")
    dask_address: DaskAddress = None
    dask_workers: DaskWorkers = None

    @field_validator("metrics")
    @classmethod
    def _metric_list(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        return check_metric_list(metrics)

    @model_validator(mode="after")
    def _fanout(self) -> PipelineConfig:
        check_fanout(self.dask_address, self.dask_workers)
        return self

    @property
    def fanout(self) -> FanOut:
        """Where the per-layer solves and per-variant QA metrics run (flows.runners)."""
        return FanOut(dask_address=self.dask_address, dask_workers=self.dask_workers)

    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run_id

    @property
    def permutations(self) -> bool:
        """Whether permutations are solved: they only matter for the fold, which PCA skips."""
        return self.solve_permutations and self.pca_dim is None


def default_run_id(teacher: str, student: str) -> str:
    """`<student>-to-<teacher>` from the folder or hub names (a run id: letters, digits, . _ -), so
    that re-running a pair without --run-id continues the same run."""
    import re

    def name(ref: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(ref.rstrip("/\\")).name or ref).strip("-._") or "model"

    return f"{name(student)}-to-{name(teacher)}"[:128]
