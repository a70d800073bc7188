"""The pooled global rotation Q = polar(Σ_l w_l C_l) from the saved moments (never the
shards), and, for PCA, the second pass for the per-token cosine of the affine k-space maps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.store.safetensors_io import load_tensors, save_tensors
from lib.store.shards import ACT_PREFIX
from lib.transport.files import GLOBAL_NAME, global_rotation_path, layer_rotation_path, qa_adapter_path
from lib.transport.plan import RotationPlan
from lib.transport.procrustes import (
    affine_residual,
    mean_cosine_under,
    pca_from_moments,
    polar,
    procrustes_residual,
    solve_pca_procrustes,
    teacher_adapter,
)
from lib.transport.solve import _centred, _meta, _relative, _top
from lib.transport.stats import CrossMoments
from lib.transport.stream import stream_pairs


def pool_rotation(plan: RotationPlan, layer_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Q = polar(Σ_l w_l C_l) from the saved moments (never the shards); per-layer cosine and
    residual under Q and ‖R_l − Q‖_F. Writes global.safetensors (+ the QA adapter with PCA)."""
    by_layer = {r["layer"]: r for r in layer_results}
    missing = [layer for layer in plan.layers if layer not in by_layer]
    if missing:
        raise BadInputError(f"pooling needs every layer's result; missing {missing}")
    moments = [CrossMoments.load(by_layer[layer]["stats_path"]) for layer in plan.layers]
    scales = []
    for w, m in zip(plan.weights, moments, strict=True):
        if plan.options.pool_scale == "normalized":
            energy = math.sqrt(m.sq_x * m.sq_y) if not plan.pca else math.sqrt(
                max(m.sq_x - m.sum_x @ m.sum_x / m.n, 0) * max(m.sq_y - m.sum_y @ m.sum_y / m.n, 0))
            scales.append(w / energy if energy > 0 else 0.0)
        else:
            scales.append(w)
    out = Path(plan.output_dir)
    per_layer: dict[str, dict[str, float]] = {}
    meta = _meta(plan, GLOBAL_NAME, "global", layers=json.dumps(list(plan.layers)), pool_scale=plan.options.pool_scale)
    adapter_file = None
    if not plan.pca:
        positive = [i for i, sc in enumerate(scales) if sc > 0]
        if len(positive) == 1:
            # polar(w C_l) = polar(C_l) = R_l: reuse it instead of a second d×d SVD.
            only = load_tensors(by_layer[plan.layers[positive[0]]]["rotation_path"])[0]
            q, s = only["rotation"], only["singular_values"] * scales[positive[0]]
        else:
            pooled = np.zeros((plan.d_student, plan.d_teacher))
            for sc, m in zip(scales, moments, strict=True):
                pooled += sc * m.cross
            q, s = polar(pooled)
        q_final = q
        for layer, m in zip(plan.layers, moments, strict=True):
            r = load_tensors(by_layer[layer]["rotation_path"])[0]["rotation"]
            per_layer[layer] = {"cosine_global": mean_cosine_under(q, m.cross_unit, m.n_unit),
                                "fit_residual_global": _relative(procrustes_residual(q, m.cross, m.sq_x, m.sq_y), m.sq_y),
                                "dist_to_global": float(np.linalg.norm(r - q))}
        save_tensors(global_rotation_path(out), {"rotation": q, "singular_values": s,
                                                 "weights": np.asarray(plan.weights, np.float64)}, meta)
    else:
        k = plan.options.pca_dim
        n = moments[0].n
        centred = [_centred(m) for m in moments]
        cov_x = sum(sc * c[0] for sc, c in zip(scales, centred, strict=True)) / n
        cov_y = sum(sc * c[1] for sc, c in zip(scales, centred, strict=True)) / n
        cc = sum(sc * c[2] for sc, c in zip(scales, centred, strict=True))
        zero_x, zero_y = np.zeros(plan.d_student), np.zeros(plan.d_teacher)
        # Pooled covariances are already centred per layer: PCA them with zero means.
        ps = pca_from_moments(cov_x, zero_x, 1, k)
        pt = pca_from_moments(cov_y, zero_y, 1, k)
        fit = solve_pca_procrustes(ps, pt, cc)
        means_x = np.stack([m.mean_x for m in moments])
        means_y = np.stack([m.mean_y for m in moments])
        for layer, m, (gxc, gyc, c_l) in zip(plan.layers, moments, centred, strict=True):
            q_l = load_tensors(by_layer[layer]["rotation_path"])[0]["rotation"]
            per_layer[layer] = {"cosine_global": None,  # filled by pca_cosines (second pass)
                                "fit_residual_global": _relative(affine_residual(fit.map, gxc, gyc, c_l), m.sq_y),
                                "dist_to_global": float(np.linalg.norm(q_l - fit.completion))}
        save_tensors(global_rotation_path(out),
                     {"rotation": fit.completion, "k_rotation": fit.r_k, "singular_values": fit.singular_values,
                      "student_basis": ps.basis, "teacher_basis": pt.basis, "student_mean": means_x,
                      "teacher_mean": means_y, "weights": np.asarray(plan.weights, np.float64)},
                     {**meta, "pca_dim": str(k)})
        adapter_file = qa_adapter_path(out)
        # The adapter acts on the *folded* student (h' = h Q_s): see lib.transport.procrustes.teacher_adapter.
        save_tensors(adapter_file, {"projection": teacher_adapter(fit)["projection"],
                                    "student_mean": means_x @ fit.completion,
                                    "teacher_mean": means_y},
                     {**meta, "kind": "qa-adapter",
                      "usage": "teacher estimate of the folded student's residual h' at layer i: "
                               "(h' - student_mean[i]) @ projection + teacher_mean[i]; i indexes `layers`"})
        s, q_final = fit.singular_values, fit.completion
    return {"rotation_path": str(global_rotation_path(out)),
            "qa_adapter_path": None if adapter_file is None else str(adapter_file),
            "det": float(np.linalg.slogdet(q_final)[0]), "top_singular_values": _top(s),
            "weights": list(plan.weights), "layers": per_layer}


class _MapCosine:
    """Σ over tokens of cos(x̂, y), x̂ = ((x − μx) B_s) R_k B_tᵀ + μy (low-rank: O(T k d))."""

    def __init__(self, bs: np.ndarray, rk: np.ndarray, bt: np.ndarray, mx: np.ndarray, my: np.ndarray) -> None:
        self.bs, self.rkbt, self.mx, self.my = bs, rk @ bt.T, mx, my
        self.total, self.n = 0.0, 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        xh = ((x - self.mx) @ self.bs) @ self.rkbt + self.my
        num = np.einsum("ij,ij->i", xh, y)
        den = np.sqrt(np.einsum("ij,ij->i", xh, xh) * np.einsum("ij,ij->i", y, y))
        self.total += float(np.sum(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))
        self.n += x.shape[0]

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


def pca_cosines(plan: RotationPlan, layer: str) -> dict[str, Any]:
    """Mean token cosine (all tokens) of the layer's own k-space map and of the pooled one."""
    own = load_tensors(layer_rotation_path(plan.output_dir, layer))[0]
    glob = load_tensors(global_rotation_path(plan.output_dir))[0]
    i = plan.layers.index(layer)
    a = _MapCosine(own["student_basis"], own["k_rotation"], own["teacher_basis"], own["student_mean"], own["teacher_mean"])
    b = _MapCosine(glob["student_basis"], glob["k_rotation"], glob["teacher_basis"], glob["student_mean"][i],
                   glob["teacher_mean"][i])

    def both(x: np.ndarray, y: np.ndarray) -> None:
        a.update(x, y)
        b.update(x, y)

    stream_pairs(plan.spans, [(ACT_PREFIX + layer, ACT_PREFIX + layer, plan.d_student, plan.d_teacher)], [both],
                 plan.options.chunk_rows)
    return {"layer": layer, "cosine_after": a.mean, "cosine_global": b.mean, "n_cosine_tokens": a.n}
