"""The pipeline's typed config and the small decisions the pipeline flow asks of `lib`.

`PipelineConfig` is the pipeline flow's single parameter: the eval-config fields (teacher,
student, metrics, dtype, device, max_length, batch size, layers, limit) plus pipeline options
(permutations, position-0 exclusion, PCA, deployments). Prefect renders it as a form in the UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

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
    metrics: Seq[Metric] = Field(METRICS, description="QA metrics to compute")
    dtype: Dtype = Field("float32", description="capture dtype")
    device: str = Field("auto", description="cpu, cuda, … (auto: cuda when available)")
    max_length: int | None = Field(64, ge=1, description="tokens per sample (truncation recorded)")
    batch_size: int = Field(8, ge=1, description="samples per forward pass")
    limit: int | None = Field(None, ge=1, description="use only the first N blurbs of the corpus (smoke runs)")
    layers: Seq[str] = Field((), description="decoder blocks to align (default: all)")
    solve_permutations: bool = Field(True, description="also solve GQA head and MLP neuron permutations")
    exclude_position0: bool = Field(False, description="leave position-0 (attention-sink) tokens out of the statistics")
    pca_dim: int | None = Field(None, ge=1, description="PCA dimension when hidden sizes differ")
    use_deployments: bool | Literal["auto"] = Field(
        "auto", description="run capture (QA's too) and fold as `gpu` deployments (run_deployment); auto: when this "
                            "run was started from a deployment")

    @field_validator("metrics")
    @classmethod
    def _metric_list(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        return check_metric_list(metrics)

    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run_id
