"""The small decisions the pipeline flow asks of `lib`: which hook points the transports
need, whether an existing fold is current, and the run's eval config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lib.core.digests import sha256_file, sha256_json
from lib.core.errors import BadInputError
from lib.models.adapters import adapter_for_config
from lib.pipeline.config import PipelineConfig
from lib.store.atomic import write_text_atomic


def model_config_of(ref: str, hf_home: str | None = None, hf_hub_cache: str | None = None) -> dict[str, Any]:
    """config.json of a local folder (or cached hub id) as a dict."""
    from lib.models.loading import read_config, resolve_model

    return read_config(resolve_model(ref, hf_home=hf_home, hf_hub_cache=hf_hub_cache))


def transport_hook_points(config: dict[str, Any], layers: list[str], permutations: bool) -> list[str]:
    """Hook points the transports need: the blocks, plus the MLP neuron inputs and per-head
    attention outputs of each block when permutations are solved."""
    ad = adapter_for_config(config)
    blocks = layers or ad.block_names()
    unknown = [b for b in blocks if ad.block_index(b) is None]
    if unknown:
        raise BadInputError(f"layers {unknown} are not decoder blocks; valid: {ad.block_names()}")
    hooks = list(blocks)
    if permutations:
        for b in blocks:
            i = ad.block_index(b)
            hooks += [ad.mlp_down_input(i), ad.attn_o_input(i)]
    return hooks


def plan_hooks(cfg: PipelineConfig) -> dict[str, Any]:
    """The run's hook points (reads only the student's config.json): `hooks` to capture (blocks,
    plus module inputs when permutations are solved), `blocks` to align, and `student_dir`, the
    student's local folder (a cached hub id resolved; the permutation solver reads its config)."""
    from lib.models.loading import resolve_model

    ref = resolve_model(cfg.student, hf_home=cfg.hf_home, hf_hub_cache=cfg.hf_hub_cache)
    student = model_config_of(ref.local_dir or cfg.student)
    return {"hooks": transport_hook_points(student, list(cfg.layers), cfg.permutations),
            "blocks": transport_hook_points(student, list(cfg.layers), False), "student_dir": ref.local_dir}


def fold_inputs(spec: str | os.PathLike, student: str, output_dir: str | os.PathLike, hf_home: str | None = None,
                hf_hub_cache: str | None = None) -> dict[str, Any]:
    """{"digest", "current"}: whether `output_dir` already holds a gated fold of exactly these
    inputs (the spec, its files and the student's revision); then the pipeline reuses it."""
    from lib.models.loading import resolve_model

    digest = spec_inputs_digest(spec, resolve_model(student, hf_home=hf_home, hf_hub_cache=hf_hub_cache).revision)
    return {"digest": digest, "current": fold_is_current(output_dir, digest)}


def spec_inputs_digest(spec_path: str | os.PathLike, source_revision: str) -> str:
    """Digest of a transforms.json, every file it references and the source checkpoint revision:
    equal digests mean an existing fold output was made from the same inputs."""
    spec = Path(spec_path)
    data = json.loads(spec.read_text(encoding="utf-8"))
    refs = [data.get("residual_rotation_path")]
    for layer in data.get("layers", []):
        refs += [v for k, v in layer.items() if k.endswith("_path")]
    files = sorted({r for r in refs if r})
    return sha256_json({"spec": sha256_file(spec), "files": [[f, sha256_file(spec.parent / f)] for f in files],
                        "source": source_revision})


FOLD_INPUTS_NAME = "pipeline_inputs.json"
FOLDED_NAME = "student-folded"  # runs/<id>/checkpoints/<this>: the pipeline's fold output


def fold_is_current(output_dir: str | os.PathLike, digest: str) -> bool:
    """True when `output_dir` holds a fold that passed its gate and was made from `digest`."""
    out = Path(output_dir)
    try:
        report = json.loads((out / "fold_report.json").read_text())
        marker = json.loads((out / FOLD_INPUTS_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return report.get("status") == "passed" and marker.get("digest") == digest


def mark_fold_inputs(output_dir: str | os.PathLike, digest: str) -> None:
    write_text_atomic(Path(output_dir) / FOLD_INPUTS_NAME, json.dumps({"digest": digest}) + "\n")


PCA_VARIANT = "student-pca"


def write_eval_config(cfg: PipelineConfig, run_dir: Path, rotation_path: str | None, folded: str | None) -> Path:
    """The run's eval config: teacher vs {student-baseline, student-rotated (solved global Q
    applied before comparing), student-folded}. With `pca_dim` (no fold; the widths may differ)
    one variant instead, student-pca: the student through the solved PCA map (global.safetensors
    as a `pca_adapter`), compared on the aligned layers (its means are per layer)."""
    layers: list[str] = []
    if cfg.pca_dim is not None:
        if not rotation_path:
            raise BadInputError(f"pca_dim {cfg.pca_dim}: the rotate step wrote no PCA map; re-run the pipeline")
        from lib.store.safetensors_io import read_header

        layers = json.loads(read_header(rotation_path).metadata.get("layers", "[]"))
        variants: list[dict[str, Any]] = [{"name": PCA_VARIANT, "path": cfg.student,
                                           "transports": [{"kind": "pca_adapter", "path": rotation_path}]}]
    else:
        variants = [{"name": "student-baseline", "path": cfg.student, "transports": []}]
        if rotation_path:
            variants.append({"name": "student-rotated", "path": cfg.student,
                             "transports": [{"kind": "rotation", "path": rotation_path}]})
        if folded:
            variants.append({"name": "student-folded", "path": folded, "transports": []})
    body = {"run_id": cfg.run_id, "runs_root": cfg.runs_root, "teacher": {"name": "teacher", "path": cfg.teacher},
            "variants": variants, "metrics": list(cfg.metrics), "dtype": cfg.dtype,
            "compute_dtype": cfg.compute_dtype, "device": cfg.device, "max_length": cfg.max_length,
            "batch_size": cfg.batch_size, "layers": layers, "limit": cfg.limit, "hf_home": cfg.hf_home,
            "hf_hub_cache": cfg.hf_hub_cache, "description": "written by the pipeline flow"}
    path = run_dir / "eval_config.json"
    write_text_atomic(path, json.dumps(body, indent=2) + "\n")
    return path
