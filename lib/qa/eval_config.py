"""The QA eval config: which checkpoints to compare with the teacher, and how (typed, frozen).

One schema, two syntaxes: JSON (`deployments/eval_template.json`) or TOML (Python's `tomllib`)::

    run_id = "nightly"                 # a run scaffolded under runs_root (`tourguide scaffold`)
    runs_root = "runs"
    metrics = ["logit_kl", "hidden_state_cosine", "residual_rms", "surprisal"]
    dtype = "float32"                  # capture dtype; compute_dtype, device, max_length, batch_size, layers, limit
    [teacher]
    path = "Qwen/Qwen3-0.6B"           # local model folder or a hub id already in the HF cache
    [[variants]]
    name = "student-rotated"
    path = "runs/nightly/checkpoints/student"
    [[variants.transports]]            # applied in order to the variant's residual before comparing
    kind = "rotation"                  # rotation | pca_adapter | permutation
    path = "runs/nightly/rotations/global.safetensors"

Relative paths are taken from the working directory (the checkout root for deployments).
`load_eval_config(path)` raises BadInputError naming the file and the key path
(`variants[1].transports[0].path`) for unknown keys, wrong types, bad values and missing paths;
`EvalConfig.model_validate(cfg.model_dump(mode="json")) == cfg` (what the flow passes between tasks).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from lib.core.dtypes import DTYPES
from lib.core.errors import BadInputError
from lib.core.options import Options, PathStr, Seq, one_of
from lib.qa.metric_names import METRICS, is_residual_layer
from lib.store.runs import check_run_id

TRANSPORT_KINDS = ("rotation", "pca_adapter", "permutation")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _known_metric(name: str) -> str:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {list(METRICS)}")
    return name


def _name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a folder and a ledger value)")
    return name


def _run_id(run_id: str) -> str:
    return check_run_id(run_id, key="run_id")


Metric = Annotated[str, AfterValidator(_known_metric), Field(json_schema_extra={"enum": list(METRICS)})]
Name = Annotated[str, AfterValidator(_name)]
RunId = Annotated[str, AfterValidator(_run_id)]
Dtype = one_of(DTYPES)


def check_metric_list(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """At least one metric, none twice (each one is known: `Metric`)."""
    if not metrics:
        raise ValueError(f"metrics: turn at least one of {list(METRICS)} on")
    for i, m in enumerate(metrics):
        if metrics.count(m) > 1:
            raise ValueError(f"metrics[{i}]: {m!r} is listed twice")
    return metrics


class TransportConfig(Options):
    """A map from the variant's residual basis to the teacher's, applied before comparing.

    rotation: safetensors tensor "rotation" [d_s, d_t] (x ↦ x @ Q, the solver's convention);
    pca_adapter: "projection" [d_s, d_t] or "student_basis" [d_s, k] + "teacher_basis" [d_t, k]
    (+ "k_rotation" [k, k], "student_mean", "teacher_mean"); permutation: "permutation" int64 [d]
    (x ↦ x[:, perm])."""

    kind: one_of(TRANSPORT_KINDS) = Field(description="rotation | pca_adapter | permutation")
    path: PathStr = Field(description="safetensors file of the transport (relative to the working directory)")


class TeacherConfig(Options):
    path: PathStr = Field(description="teacher checkpoint: local model folder or a hub id already in the HF cache")
    name: Name = Field("teacher", description="label in the ledgers and the report")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub id")


class VariantConfig(Options):
    name: Name = Field(description="label in the ledgers and the report (unique)")
    path: PathStr = Field(description="checkpoint to compare: local model folder or cached hub id")
    revision: str | None = Field(None, description="hub revision of a hub id")
    transports: Seq[TransportConfig] = Field((), description="applied in order to the variant's residual before comparing")


class EvalConfig(Options):
    """Which checkpoints to compare with the teacher, and how."""

    label = "eval config"

    run_id: RunId = Field(description="a run scaffolded under runs_root (`tourguide scaffold`)")
    teacher: TeacherConfig = Field(description="the reference model")
    variants: Seq[VariantConfig] = Field(description="the checkpoints compared with the teacher")
    runs_root: PathStr = Field("runs", description="where run folders live")
    metrics: Seq[Metric] = Field(METRICS, description="QA metrics to compute")
    dtype: Dtype = Field("float32", description="capture dtype")
    compute_dtype: Dtype | None = Field(None, description="dtype of the forward pass (default: dtype)")
    device: str = Field("auto", description="cpu, cuda, … (auto: cuda when available)")
    max_length: int | None = Field(None, ge=1, description="tokens per sample (truncation recorded)")
    batch_size: int = Field(8, ge=1, description="samples per forward pass")
    layers: Seq[str] = Field((), description="capture hook points; empty: every decoder block")
    limit: int | None = Field(None, ge=1, description="first N blurbs of the snapshot only (smoke runs)")
    hf_home: PathStr | None = Field(None, description="HF_HOME whose hub cache holds hub ids")
    hf_hub_cache: PathStr | None = Field(None, description="HF hub cache folder (overrides hf_home)")
    description: str = Field("", description="free text")

    @field_validator("metrics")
    @classmethod
    def _metric_list(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        return check_metric_list(metrics)

    @field_validator("variants")
    @classmethod
    def _some_variant(cls, variants: tuple[VariantConfig, ...]) -> tuple[VariantConfig, ...]:
        if not variants:
            raise ValueError("variants: list at least one checkpoint variant to compare with the teacher")
        return variants

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        names = [self.teacher.name] + [v.name for v in self.variants]
        keys = ["teacher.name"] + [f"variants[{i}].name" for i in range(len(self.variants))]
        for idx, (key, name) in enumerate(zip(keys, names, strict=True)):
            if name in names[:idx]:
                raise ValueError(f"{key}: name {name!r} is used twice (teacher and variant names must be unique)")
        if self.layers and not any(is_residual_layer(x) for x in self.layers) and \
                set(self.metrics) & {"hidden_state_cosine", "residual_rms"}:
            raise ValueError(f"layers: none of {list(self.layers)} is a decoder block output (model.layers.N); "
                             "hidden_state_cosine and residual_rms need at least one (or leave `layers` empty: every block)")
        return self

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise BadInputError(f"no variant named {name!r}; the config has {[v.name for v in self.variants]}")


def load_eval_config(path: str | os.PathLike, check_paths: bool = True) -> EvalConfig:
    """Read a `.json` or `.toml` eval config; with `check_paths`, every model and transport path
    must exist (hub ids must be in the HF cache)."""
    cfg = EvalConfig.from_file(path, hint="start from deployments/eval_template.json (the qa/nightly deployment's "
                                          "default, runs/demo/eval_config.json, is written by `tourguide demo`)")
    if check_paths:
        check_config_paths(cfg, str(path))
    return cfg


def _probe(test: Any) -> bool:
    """test() of a path from the config, False when the path is unusable (over-long name, NUL,
    '~nosuchuser'): pathlib raises for those instead of answering."""
    try:
        return bool(test())
    except (OSError, RuntimeError, ValueError):
        return False


def check_config_paths(cfg: EvalConfig, source: str) -> None:
    """Every model folder / cached hub id and every transport file must exist."""
    for key in ("hf_home", "hf_hub_cache"):
        val = getattr(cfg, key)
        if val is not None and not _probe(lambda: Path(val).is_dir()):
            raise BadInputError(f"{source}: {key}: folder {val} not found")
    models = [("teacher.path", cfg.teacher.path, cfg.teacher.revision)]
    models += [(f"variants[{i}].path", v.path, v.revision) for i, v in enumerate(cfg.variants)]
    for key, ref, revision in models:
        _check_model(cfg, source, key, ref, revision)
    for i, v in enumerate(cfg.variants):
        for j, t in enumerate(v.transports):
            if not _probe(lambda: Path(t.path).is_file()):
                raise BadInputError(f"{source}: variants[{i}].transports[{j}].path: {t.kind} file {t.path} not found "
                                    "(relative paths are taken from the working directory); run `tourguide rotate` "
                                    "first or fix the path")


def _check_model(cfg: EvalConfig, source: str, key: str, ref: str, revision: str | None) -> None:
    from lib.models.loading import looks_like_path, resolve_model

    if _probe(lambda: Path(ref).expanduser().exists()) or looks_like_path(ref):
        if not _probe(lambda: (Path(ref).expanduser() / "config.json").is_file()):
            raise BadInputError(f"{source}: {key}: model folder {ref} not found or has no config.json "
                                "(relative paths are taken from the working directory); fix the path")
        return
    try:  # a hub id: cheap to resolve (no hashing), and fails clearly when not cached
        resolve_model(ref, revision, cfg.hf_home, cfg.hf_hub_cache)
    except BadInputError as exc:
        raise BadInputError(f"{source}: {key}: {exc}") from None
