"""transforms.json, the fold's contract: read (structure only), resolve its paths inside the
run directory, read its tensors, and write one from arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.fold.checks import _to_numpy, derive_kv_permutation
from lib.models.adapters import adapter_for_config
from lib.store.atomic import write_text_atomic
from lib.store.safetensors_io import read_header, read_tensors, save_tensors

SPEC_VERSION = 1


LAYER_PATH_KEYS = ("rotation_path", "head_permutation_path", "neuron_permutation_path", "vo_rotation_path",
                   "qk_rotation_path")


TOP_PATH_KEYS = ("residual_rotation_path",)


def read_spec(spec_path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally check transforms.json (no tensors loaded)."""
    path = Path(spec_path)
    if not path.is_file():
        raise BadInputError(f"{path}: spec file not found; pass --spec runs/<id>/transforms.json (written by "
                            "`tourguide rotate`) or a hand-written one")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise BadInputError(f"{path}: not valid JSON ({str(exc)[:200]}); fix the file") from None
    if not isinstance(spec, dict):
        raise BadInputError(f"{path}: top level must be a JSON object with a 'layers' list")
    if spec.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise BadInputError(f"{path}: version {spec.get('version')!r} is not supported (this build reads version {SPEC_VERSION})")
    unknown = [k for k in spec if k.endswith("_path") and k not in TOP_PATH_KEYS]
    if unknown:
        raise BadInputError(f"{path}: unknown transform key(s) {unknown}; known: {list(TOP_PATH_KEYS)} (a transform this "
                            "build does not understand is never skipped silently)")
    layers = spec.get("layers")
    if not isinstance(layers, list):
        raise BadInputError(f"{path}: 'layers' must be a list of {{\"name\": \"model.layers.N\", ...}} objects "
                            f"(got {type(layers).__name__}); use [] for a residual rotation only")
    for n, entry in enumerate(layers):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadInputError(f"{path}: layers[{n}] must be an object with a string 'name' (e.g. \"model.layers.0\")")
        bad = [k for k in entry if k.endswith("_path") and k not in LAYER_PATH_KEYS]
        if bad:
            raise BadInputError(f"{path}: layers[{n}] ({entry['name']}) has unknown transform key(s) {bad}; "
                                f"known: {list(LAYER_PATH_KEYS)}")
        hd = entry.get("head_dim")
        if hd is not None and (isinstance(hd, bool) or not isinstance(hd, int)):
            raise BadInputError(f"{path}: layers[{n}] ({entry['name']}) head_dim must be an integer, got {hd!r}")
    return spec


def spec_root(spec_path: str | os.PathLike) -> Path:
    """The folder spec paths must stay inside: the run dir containing the spec (nearest ancestor
    with a manifest.json or ledgers/), else the spec's own folder."""
    folder = Path(spec_path).resolve().parent
    for cand in (folder, *folder.parents):
        if (cand / "manifest.json").is_file() or (cand / "ledgers").is_dir():
            return cand
    return folder


def resolve_spec_file(spec_path: Path, rel: str, root: Path, allow_outside: bool, where: str) -> Path:
    try:
        file = (spec_path.resolve().parent / rel).resolve()
        is_file = file.is_file()
    except (ValueError, OSError) as exc:  # NUL byte, unencodable or over-long name, symlink loop
        raise BadInputError(f"{where}: path {rel!r:.80} is not a usable file path ({exc.__class__.__name__}); "
                            "fix the spec") from None
    if not allow_outside and not file.is_relative_to(root):
        raise BadInputError(f"{where}: path {rel!r} resolves to {file}, outside the run directory {root}; "
                            "keep transform files inside the run, or pass --allow-outside-paths")
    if not is_file:
        raise BadInputError(f"{where}: file {rel!r} not found (looked at {file}); paths are relative to the spec's folder")
    return file


def read_spec_tensors(file: Path, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> dict[str, Any]:
    """Named tensors of a small safetensors file as numpy arrays (extra tensors are ignored)."""
    try:
        header = read_header(file)
        missing = [k for k in required if k not in header.tensors]
        if missing:
            raise BadInputError(f"{file.name} has no tensor {missing[0]!r} (it holds {sorted(header.tensors)})")
        return read_tensors(header, [k for k in (*required, *optional) if k in header.tensors])
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None


def write_spec(path: str | os.PathLike, layers: Sequence[Mapping[str, Any]], *, model_type: str | None = None,
               residual_rotation_path: str | None = None, provenance: Mapping[str, Any] | None = None) -> Path:
    """The one writer of transforms.json (the fold's contract): {"version", "model_type"?,
    "residual_rotation_path"?, "layers": [{name, <kind>_path..., head_dim?}], "provenance"?},
    paths relative to the spec's folder; written atomically. Nothing is validated here
    (`WeightTransformSet.from_spec` does)."""
    spec: dict[str, Any] = {"version": SPEC_VERSION}
    if model_type:
        spec["model_type"] = model_type
    if residual_rotation_path is not None:
        spec["residual_rotation_path"] = residual_rotation_path
    spec["layers"] = [dict(e) for e in layers]
    if provenance is not None:
        spec["provenance"] = dict(provenance)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(spec, indent=2, ensure_ascii=False) + "\n")


def write_transform_spec(folder: str | os.PathLike, config: Any, *, residual_rotation: Any = None,
                         layer_rotations: Mapping[int | str, Any] | None = None,
                         head_permutations: Mapping[int | str, Any] | None = None,
                         neuron_permutations: Mapping[int | str, Any] | None = None,
                         vo_rotations: Mapping[int | str, Any] | None = None,
                         qk_rotations: Mapping[int | str, Any] | None = None,
                         name: str = "transforms.json", with_kv_permutation: bool = True) -> Path:
    """Write arrays as a `transforms.json` + safetensors files in `folder` (the contract format):
    rotations/global.safetensors, rotations/<layer>.{rotation,vo,qk}.safetensors,
    permutations/<layer>.{heads,mlp}.safetensors. Nothing is validated here (tests write bad
    specs on purpose); `WeightTransformSet.from_spec` validates. Returns the spec path."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    adapter = adapter_for_config(cfg)
    folder = Path(folder)
    (folder / "rotations").mkdir(parents=True, exist_ok=True)
    (folder / "permutations").mkdir(parents=True, exist_ok=True)

    def save(rel: str, tensors: dict[str, np.ndarray]) -> str:
        save_tensors(folder / rel, tensors)
        return rel

    def block(k: int | str) -> str:
        return adapter.block_name(k) if isinstance(k, int | np.integer) else str(k)

    residual = None
    if residual_rotation is not None:
        residual = save("rotations/global.safetensors", {"rotation": _to_numpy(residual_rotation).astype(np.float64)})
    entries: dict[str, dict[str, Any]] = {}

    def entry(k: int | str) -> dict[str, Any]:
        n = block(k)
        return entries.setdefault(n, {"name": n, "head_dim": adapter.head_dim})

    for k, q in (layer_rotations or {}).items():
        entry(k)["rotation_path"] = save(f"rotations/{block(k)}.rotation.safetensors",
                                         {"rotation": _to_numpy(q).astype(np.float64)})
    for k, p in (head_permutations or {}).items():
        p = _to_numpy(p).astype(np.int64)
        tensors = {"permutation": p}
        kv, _ = derive_kv_permutation(p, adapter.num_heads, adapter.num_kv_heads) if p.ndim == 1 and len(p) == adapter.num_heads else (None, [])
        if with_kv_permutation and kv is not None:
            tensors["kv_permutation"] = kv
        entry(k)["head_permutation_path"] = save(f"permutations/{block(k)}.heads.safetensors", tensors)
    for k, p in (neuron_permutations or {}).items():
        entry(k)["neuron_permutation_path"] = save(f"permutations/{block(k)}.mlp.safetensors",
                                                   {"permutation": _to_numpy(p).astype(np.int64)})
    for k, r in (vo_rotations or {}).items():
        entry(k)["vo_rotation_path"] = save(f"rotations/{block(k)}.vo.safetensors",
                                            {"rotation": _to_numpy(r).astype(np.float64)})
    for k, r in (qk_rotations or {}).items():
        entry(k)["qk_rotation_path"] = save(f"rotations/{block(k)}.qk.safetensors",
                                            {"rotation": _to_numpy(r).astype(np.float64)})
    layers = [entries[n] for n in sorted(entries, key=lambda n: (adapter.block_index(n) or 0, n))]
    return write_spec(folder / name, layers, model_type=adapter.model_type, residual_rotation_path=residual)
