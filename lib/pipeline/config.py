"""The pipeline's typed config and the small decisions the pipeline flow asks of `lib`.

`PipelineConfig` is the pipeline flow's single parameter: the eval-config fields (teacher,
student, metrics, dtype, device, max_length, batch size, layers, limit) plus pipeline options
(permutations, position-0 exclusion, PCA, deployments). Prefect renders it as a form in the UI.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

METRICS = ["logit_kl", "hidden_state_cosine", "residual_rms", "surprisal"]


class PipelineConfig(BaseModel):
    """One pipeline run: student vs teacher → transports → fold → gate → QA → report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field("demo", description="run folder name under runs_root")
    runs_root: str = Field("runs", description="where run folders live")
    teacher: str = Field(..., description="teacher checkpoint: local folder or cached hub id")
    student: str = Field(..., description="student checkpoint: local folder or cached hub id")
    metrics: list[str] = Field(default_factory=lambda: list(METRICS), description="QA metrics to compute")
    dtype: str = Field("float32", description="capture dtype")
    device: str = Field("auto", description="cpu, cuda, … (auto: cuda when available)")
    max_length: int | None = Field(64, description="tokens per sample (truncation recorded)")
    batch_size: int = Field(8, description="samples per forward pass")
    limit: int | None = Field(None, description="use only the first N blurbs of the corpus (smoke runs)")
    layers: list[str] = Field(default_factory=list, description="decoder blocks to align (default: all)")
    solve_permutations: bool = Field(True, description="also solve GQA head and MLP neuron permutations")
    exclude_position0: bool = Field(False, description="leave position-0 (attention-sink) tokens out of the statistics")
    pca_dim: int | None = Field(None, description="PCA dimension when hidden sizes differ")
    use_deployments: bool = Field(False, description="run capture and fold as `gpu` deployments (run_deployment)")

    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run_id
