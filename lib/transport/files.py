"""Where the rotate job writes its files (one naming scheme for every writer and reader).

    <output-dir>/<layer>.safetensors                 per-layer rotation (diagnostic) + singular values
    <output-dir>/global.safetensors                  the pooled, foldable rotation Q
    <output-dir>/global.qa_adapter.safetensors       PCA only: the teacher projection for QA
    <output-dir>/stats/<layer>.safetensors           the float64 moments (CrossMoments)
    <output-dir>/permutations/<layer>.{heads,mlp}.safetensors
"""

from __future__ import annotations

import os
from pathlib import Path

ROTATION_VERSION = "1"


GLOBAL_NAME = "global"


def safe_layer_name(layer: str) -> str:
    """A file-name form of a hook point ('model.layers.3' stays; ':' and '/' become '_')."""
    return layer.replace("/", "_").replace(":", "_")


def layer_rotation_path(output_dir: str | os.PathLike, layer: str) -> Path:
    return Path(output_dir) / f"{safe_layer_name(layer)}.safetensors"


def layer_stats_path(output_dir: str | os.PathLike, layer: str) -> Path:
    return Path(output_dir) / "stats" / f"{safe_layer_name(layer)}.safetensors"


def global_rotation_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{GLOBAL_NAME}.safetensors"


def qa_adapter_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{GLOBAL_NAME}.qa_adapter.safetensors"


def permutation_paths(output_dir: str | os.PathLike, layer: str) -> tuple[Path, Path]:
    """(heads file, mlp file) of one layer."""
    folder = Path(output_dir) / "permutations"
    return folder / f"{safe_layer_name(layer)}.heads.safetensors", folder / f"{safe_layer_name(layer)}.mlp.safetensors"
