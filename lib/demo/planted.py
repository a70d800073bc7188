"""The offline demo's planted student and the check that the pipeline recovered it.

`plant_student(teacher, out)` folds a known global residual rotation Q, a GQA-consistent head
permutation and an MLP neuron permutation per layer into the teacher (an exact, function-keeping
fold) and then adds small relative weight noise, so the student computes almost the teacher's
function in scrambled coordinates. Solving student→teacher must then find Qᵀ and the inverse
permutations; `compare_recovery` measures how close the solution came.

    python -m lib.demo TEACHER_DIR OUT_DIR --noise 0.01
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.core.errors import BadInputError
from lib.models.adapters import adapter_for_config
from lib.store.safetensors_io import read_header, read_tensors, save_tensors

PLANTED_NAME = "planted_transforms.safetensors"


@dataclass(frozen=True)
class Planted:
    """What was planted: rotation [d, d] float64, per-layer head [H] and neuron [I] int64 perms
    (new unit j of the student = teacher unit perm[j])."""

    rotation: np.ndarray
    head_permutations: dict[int, np.ndarray]
    neuron_permutations: dict[int, np.ndarray]

    def save(self, path: Path) -> None:
        tensors = {"rotation": self.rotation}
        tensors.update({f"heads.{i}": p for i, p in self.head_permutations.items()})
        tensors.update({f"neurons.{i}": p for i, p in self.neuron_permutations.items()})
        save_tensors(path, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Planted:
        t = read_tensors(path)
        heads = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("heads.")}
        neurons = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("neurons.")}
        return cls(t["rotation"], heads, neurons)


def plant_student(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
                  noise: float = 0.01, rotate: bool = True, permute_heads: bool = True,
                  permute_neurons: bool = True) -> Planted:
    """Write a student checkpoint to `out_dir` (replaced if present) = teacher with planted
    transforms + Gaussian noise of `noise` × each tensor's RMS. Saves the planted transforms as
    `out_dir/planted_transforms.safetensors` and returns them."""
    from lib.fold.checkpoint import fold_checkpoint
    from lib.fold.transform_set import WeightTransformSet
    from lib.testing.random_transforms import random_head_permutation, random_rotation

    teacher = Path(teacher_dir)
    cfg = json.loads((teacher / "config.json").read_text())
    ad = adapter_for_config(cfg)
    rng = np.random.default_rng(seed)
    q = random_rotation(ad.hidden_size, seed) if rotate else np.eye(ad.hidden_size)
    heads = {i: random_head_permutation(ad.num_heads, ad.num_kv_heads, seed + 1 + i) for i in range(ad.num_layers)} \
        if permute_heads else {}
    neurons = {i: rng.permutation(ad.intermediate_size).astype(np.int64) for i in range(ad.num_layers)} \
        if permute_neurons else {}
    ts = WeightTransformSet.from_arrays(cfg, residual_rotation=q if rotate else None,
                                       head_permutations=heads, neuron_permutations=neurons)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    fold_checkpoint(teacher, out, ts)
    (out / "fold_report.json").unlink(missing_ok=True)  # the student is a source model, not a fold output
    if noise > 0:
        add_weight_noise(out, noise, seed)
    planted = Planted(q, heads, neurons)
    planted.save(out / PLANTED_NAME)
    return planted


def add_weight_noise(folder: Path, noise: float, seed: int) -> None:
    """W ← W + noise·rms(W)·N(0, 1) for every floating tensor of every shard (norm gains too)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 12345)
    for shard in sorted(folder.glob("*.safetensors")):
        header = read_header(shard)
        tensors = read_tensors(header, framework="pt")
        order = [i.name for i in sorted(header.tensors.values(), key=lambda i: i.begin)]
        for k in order:  # file order, as the noise was always drawn
            t = tensors[k]
            if t.is_floating_point():
                t64 = t.double()
                rms = t64.pow(2).mean().sqrt()
                tensors[k] = (t64 + noise * rms * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(t.dtype)
        save_tensors(shard, tensors, {"format": "pt"}, order=order)  # a source model: no fold marker


@dataclass(frozen=True)
class Recovery:
    """How close the solved student→teacher transforms are to the inverse of the planted ones."""

    rotation_max_abs_err: float  # max |Q_solved − Q_plantedᵀ|
    rotation_rel_fro_err: float  # ‖Q_solved − Q_plantedᵀ‖_F / ‖Q‖_F
    head_accuracy: float  # fraction of query heads mapped right (1.0 = exact), over layers
    neuron_accuracy: float  # fraction of MLP neurons mapped right, over layers


def compare_recovery(planted: Planted, solved_rotation: np.ndarray | None,
                     solved_heads: dict[int, np.ndarray], solved_neurons: dict[int, np.ndarray]) -> Recovery:
    """Compare solved transforms (student→teacher, new = old[perm]) with the planted ones
    (teacher→student): the expected solution is Qᵀ and argsort(perm)."""
    if solved_rotation is not None:
        diff = np.asarray(solved_rotation, dtype=np.float64) - planted.rotation.T
        rmax, rfro = float(np.abs(diff).max()), float(np.linalg.norm(diff) / np.linalg.norm(planted.rotation))
    else:
        rmax = rfro = float("nan")

    def acc(pl: dict[int, np.ndarray], so: dict[int, np.ndarray]) -> float:
        if not pl:
            return float("nan")
        missing = sorted(set(pl) - set(so))
        if missing:
            raise BadInputError(f"no solved permutation for layer(s) {missing}")
        hits = [np.mean(np.asarray(so[i]) == np.argsort(p)) for i, p in pl.items()]
        return float(np.mean(hits))

    return Recovery(rmax, rfro, acc(planted.head_permutations, solved_heads), acc(planted.neuron_permutations, solved_neurons))


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Plant known transforms + noise into a copy of a teacher.")
    ap.add_argument("teacher")
    ap.add_argument("out")
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = plant_student(a.teacher, a.out, seed=a.seed, noise=a.noise)
    print(f"planted rotation {p.rotation.shape}, {len(p.head_permutations)} head and "
          f"{len(p.neuron_permutations)} neuron permutations → {a.out}")


def solved_from_spec(spec_path: str | os.PathLike) -> tuple[np.ndarray | None, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The solved global rotation and per-layer head / neuron permutations named by a
    transforms.json (layer keys are block indices)."""
    spec = Path(spec_path)
    data = json.loads(spec.read_text(encoding="utf-8"))

    def tensor(key: str, rel: str) -> np.ndarray:
        return read_tensors(spec.parent / rel, [key])[key]

    q = tensor("rotation", data["residual_rotation_path"]) if data.get("residual_rotation_path") else None
    heads, neurons = {}, {}
    for entry in data.get("layers", []):
        i = int(entry["name"].rsplit(".", 1)[-1])
        if entry.get("head_permutation_path"):
            heads[i] = tensor("permutation", entry["head_permutation_path"])
        if entry.get("neuron_permutation_path"):
            neurons[i] = tensor("permutation", entry["neuron_permutation_path"])
    return q, heads, neurons


def recovery_from_spec(student_dir: str | os.PathLike, spec_path: str | os.PathLike) -> dict[str, float]:
    """`compare_recovery` of the transforms a transforms.json names against the ones planted
    into `student_dir` (as a dict)."""
    from dataclasses import asdict

    planted = Planted.load(Path(student_dir) / PLANTED_NAME)
    return asdict(compare_recovery(planted, *solved_from_spec(spec_path)))


PLANT_MARKER = "plant.json"


def ensure_planted_student(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
                           noise: float = 0.01) -> tuple[Planted, bool]:
    """`plant_student` unless `out_dir` already holds a student planted from the same teacher
    revision, seed and noise (so a second demo run reuses it). Returns (planted, built)."""
    from lib.models.loading import folder_revision

    out = Path(out_dir)
    key = {"teacher": folder_revision(str(Path(teacher_dir).resolve())), "seed": seed, "noise": noise, "v": 1}
    marker = out / PLANT_MARKER
    try:
        if json.loads(marker.read_text()) == key and (out / PLANTED_NAME).exists():
            return Planted.load(out / PLANTED_NAME), False
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    planted = plant_student(teacher_dir, out, seed=seed, noise=noise)
    from lib.store.atomic import write_text_atomic

    write_text_atomic(marker, json.dumps(key) + "\n")
    return planted, True
