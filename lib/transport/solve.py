"""Solve one layer: stream its paired rows once into float64 moments (plus neuron and
head correlations with --solve-permutations), then R_l = polar(C_l) or the k-space PCA
Procrustes, and the Hungarian permutations. Writes the layer's files (lib.transport.files).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.store.safetensors_io import save_tensors
from lib.store.shards import ACT_PREFIX
from lib.transport.files import ROTATION_VERSION, layer_rotation_path, layer_stats_path, permutation_paths
from lib.transport.permutations import HeadCorrelation, NeuronCorrelation, match_heads_gqa, match_units
from lib.transport.plan import PermutationLayer, RotationPlan
from lib.transport.procrustes import (
    affine_residual,
    centred_cross,
    mean_cosine_under,
    pca_from_moments,
    polar,
    procrustes_residual,
    solve_pca_procrustes,
)
from lib.transport.stats import CrossMoments
from lib.transport.stream import stream_pairs

TOP_SINGULAR_VALUES = 8


def _meta(plan: RotationPlan, layer: str, kind: str, **extra: Any) -> dict[str, str]:
    base = {"rotation_version": ROTATION_VERSION, "layer": layer, "kind": kind, "run_id": plan.run_id,
            "student_index": plan.student_index, "teacher_index": plan.teacher_index, "n_tokens": str(plan.n_tokens),
            "excluded_position0": str(plan.options.exclude_position0).lower(),
            "convention": "student residual x (row) maps to x @ rotation ≈ teacher residual"}
    return {**base, **{k: str(v) for k, v in extra.items()}}


def _relative(residual: float, teacher_energy: float) -> float:
    """‖X̂ − Y‖²_F / ‖Y‖²_F (NaN for an all-zero teacher)."""
    return residual / teacher_energy if teacher_energy > 0 else float("nan")


def _top(s: np.ndarray) -> list[float]:
    return [float(v) for v in s[:TOP_SINGULAR_VALUES]]


def solve_layer(plan: RotationPlan, layer: str) -> dict[str, Any]:
    """Stream one layer's paired rows once and solve it. Writes stats/<layer>, <layer> and (with
    permutations) permutations/<layer>.{heads,mlp}.safetensors. Returns a JSON-able result."""
    t0 = time.perf_counter()
    d_s, d_t, k = plan.d_student, plan.d_teacher, plan.options.pca_dim
    moments = CrossMoments(d_s, d_t, full=plan.pca or plan.options.full_moments,
                           cosine_stride=0 if plan.pca else plan.cosine_stride)
    tensors = [(ACT_PREFIX + layer, ACT_PREFIX + layer, d_s, d_t)]
    sinks = [moments.update]
    perm = plan.permutation_for(layer)
    neurons = heads = None
    if perm is not None:
        neurons = NeuronCorrelation(perm.intermediate_size, perm.intermediate_size)
        heads = HeadCorrelation(perm.num_heads, perm.head_dim)
        width = perm.num_heads * perm.head_dim
        tensors += [(ACT_PREFIX + perm.mlp_hook, ACT_PREFIX + perm.mlp_hook, perm.intermediate_size, perm.intermediate_size),
                    (ACT_PREFIX + perm.heads_hook, ACT_PREFIX + perm.heads_hook, width, width)]
        sinks += [neurons.update, heads.update]
    n = stream_pairs(plan.spans, tensors, sinks, plan.options.chunk_rows)
    if n != plan.n_tokens:
        raise BadInputError(f"layer {layer}: streamed {n} paired tokens, the plan expected {plan.n_tokens}; "
                            "a shard changed during the run, re-run `tourguide rotate`")
    out = Path(plan.output_dir)
    stats_path = moments.save(layer_stats_path(out, layer), _meta(plan, layer, "stats"))
    result: dict[str, Any] = {"layer": layer, "n_tokens": n, "d_student": d_s, "d_teacher": d_t, "pca_dim": k,
                              "cosine_before": moments.cosine_before, "stats_path": str(stats_path)}
    if not plan.pca:
        r, s = polar(moments.cross)
        result.update(kind="procrustes", cosine_after=mean_cosine_under(r, moments.cross_unit, moments.n_unit),
                      n_cosine_tokens=moments.n_unit,
                      fit_residual=_relative(procrustes_residual(r, moments.cross, moments.sq_x, moments.sq_y), moments.sq_y),
                      top_singular_values=_top(s))
        save_tensors(layer_rotation_path(out, layer), {"rotation": r, "singular_values": s},
                     _meta(plan, layer, "procrustes", **{k_: result[k_] for k_ in (
                         "cosine_before", "cosine_after", "n_cosine_tokens", "fit_residual")}))
    else:
        fit = solve_pca_procrustes(pca_from_moments(moments.gram_x, moments.sum_x, n, k),
                                   pca_from_moments(moments.gram_y, moments.sum_y, n, k),
                                   centred_cross(moments.cross, moments.sum_x, moments.sum_y, n))
        gxc, gyc, cc = _centred(moments)
        save_tensors(layer_rotation_path(out, layer),
                     {"rotation": fit.completion, "k_rotation": fit.r_k, "singular_values": fit.singular_values,
                      "student_basis": fit.student.basis, "teacher_basis": fit.teacher.basis,
                      "student_mean": fit.student.mean, "teacher_mean": fit.teacher.mean,
                      "student_variance": fit.student.variance, "teacher_variance": fit.teacher.variance},
                     _meta(plan, layer, "pca-procrustes", pca_dim=k))
        result.update(kind="pca-procrustes", cosine_after=None, n_cosine_tokens=0,
                      fit_residual=_relative(affine_residual(fit.map, gxc, gyc, cc), moments.sq_y),
                      top_singular_values=_top(fit.singular_values))
    result["rotation_path"] = str(layer_rotation_path(out, layer))
    if perm is not None:
        result["permutations"] = _save_permutations(plan, perm, neurons, heads)
    result["seconds"] = time.perf_counter() - t0
    return result


def _centred(m: CrossMoments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = m.n
    return (m.gram_x - np.outer(m.sum_x, m.sum_x) / n, m.gram_y - np.outer(m.sum_y, m.sum_y) / n,
            centred_cross(m.cross, m.sum_x, m.sum_y, n))


def _save_permutations(plan: RotationPlan, perm: PermutationLayer, neurons: NeuronCorrelation,
                       heads: HeadCorrelation) -> dict[str, Any]:
    mlp = match_units(neurons.correlation())
    sim = heads.similarity()
    hm = match_heads_gqa(sim, perm.num_kv_heads)
    heads_file, mlp_file = permutation_paths(plan.output_dir, perm.layer)
    meta = {"head_dim": perm.head_dim, "num_heads": perm.num_heads, "num_kv_heads": perm.num_kv_heads,
            "convention": "new = old[permutation]; maps the student onto the teacher"}
    save_tensors(heads_file, {"permutation": hm.perm, "kv_permutation": hm.kv_perm, "similarity": sim,
                              "matched_similarity": hm.matched}, _meta(plan, perm.layer, "head-permutation", **meta))
    save_tensors(mlp_file, {"permutation": mlp.perm, "matched_correlation": mlp.matched},
                 _meta(plan, perm.layer, "neuron-permutation", intermediate_size=perm.intermediate_size))
    return {"heads_path": str(heads_file), "mlp_path": str(mlp_file), "head_dim": perm.head_dim,
            "heads_mean_similarity": hm.mean_matched, "heads_identity": bool(np.array_equal(hm.perm, np.arange(perm.num_heads))),
            "mlp_mean_correlation": mlp.mean_matched,
            "mlp_moved": int(np.sum(mlp.perm != np.arange(perm.intermediate_size)))}
