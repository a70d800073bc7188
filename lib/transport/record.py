"""Recording a rotate job: one ledger row per layer, transforms.json for the fold, the
printed table; and `run_rotation`, the whole job in-process (tests, notebooks, benchmarks).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lib.transport.options import RotateOptions
from lib.transport.plan import RotationPlan, plan_rotation
from lib.transport.pool import pca_cosines, pool_rotation
from lib.transport.solve import solve_layer


def merge_results(plan: RotationPlan, layer_results: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any],
                  cosines: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One flat dict per layer (in plan order) with everything the ledger and table show."""
    by_layer = {r["layer"]: dict(r) for r in layer_results}
    cos = {c["layer"]: c for c in cosines}
    rows = []
    for layer in plan.layers:
        r = by_layer[layer]
        r.update(pooled["layers"][layer])
        if layer in cos:
            r.update(cosine_after=cos[layer]["cosine_after"], cosine_global=cos[layer]["cosine_global"],
                     n_cosine_tokens=cos[layer]["n_cosine_tokens"])
        rows.append(r)
    return rows


def ledger_rows(plan: RotationPlan, merged: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from lib.store.ledgers import now_iso

    at = now_iso()
    return [{"run_id": plan.run_id, "recorded_at": at, "layer": r["layer"], "kind": r["kind"],
             "n_tokens": int(r["n_tokens"]), "d_student": int(r["d_student"]), "d_teacher": int(r["d_teacher"]),
             "pca_dim": r["pca_dim"], "cosine_before": r["cosine_before"], "cosine_after": r["cosine_after"],
             "cosine_global": r["cosine_global"], "fit_residual": r["fit_residual"],
             "dist_to_global": r["dist_to_global"], "excluded_position0": plan.options.exclude_position0,
             "top_singular_values": json.dumps([round(v, 6) for v in r["top_singular_values"]]),
             "rotation_path": r["rotation_path"], "student_index": plan.student_index,
             "teacher_index": plan.teacher_index} for r in merged]


def write_rotation_spec(plan: RotationPlan, merged: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any]) -> Path:
    """transforms.json for the fold (paths relative to the spec's folder, written by the fold's
    one spec writer): the pooled Q as residual_rotation_path, per-layer head/neuron permutations,
    rotation_path null (per-layer rotations are diagnostics: only the one global Q folds exactly)."""
    from lib.fold.spec import write_spec

    folder = Path(plan.spec_out).resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), folder)

    entries = []
    for r in merged:
        perms = r.get("permutations") or {}
        entry = {"name": r["layer"], "rotation_path": None,
                 "head_permutation_path": rel(perms.get("heads_path")),
                 "neuron_permutation_path": rel(perms.get("mlp_path"))}
        head_dim = perms.get("head_dim", plan.head_dim)
        if head_dim is not None:
            entry["head_dim"] = int(head_dim)
        entries.append(entry)
    provenance = {"run_id": plan.run_id, "student_index": plan.student_index, "teacher_index": plan.teacher_index,
                  "n_tokens": plan.n_tokens, "pca_dim": plan.options.pca_dim,
                  "excluded_position0": plan.options.exclude_position0, "qa_adapter": rel(pooled.get("qa_adapter_path"))}
    return write_spec(plan.spec_out, entries, model_type=plan.model_type, residual_rotation_path=rel(pooled["rotation_path"]),
                      provenance=provenance)


def fmt_value(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_rotation_table(merged: Sequence[Mapping[str, Any]]) -> str:
    head = (f"{'layer':24} {'kind':14} {'tokens':>8} {'d_s→d_t':>11} {'cos before':>10} {'cos R_l':>8} {'cos Q':>8} "
            f"{'resid R_l':>9} {'resid Q':>8} {'|R_l-Q|':>8} {'top σ':>10}")
    perm = any(r.get("permutations") for r in merged)
    if perm:
        head += f" {'heads sim':>9} {'mlp corr':>8}"
    lines = [head]
    for r in merged:
        line = (f"{r['layer']:24} {r['kind']:14} {r['n_tokens']:>8} {str(r['d_student']) + '→' + str(r['d_teacher']):>11} "
                f"{fmt_value(r['cosine_before']):>10} {fmt_value(r['cosine_after']):>8} {fmt_value(r['cosine_global']):>8} "
                f"{fmt_value(r['fit_residual']):>9} {fmt_value(r['fit_residual_global']):>8} {fmt_value(r['dist_to_global'], '.3f'):>8} "
                f"{fmt_value(r['top_singular_values'][0] if r['top_singular_values'] else None, '.4g'):>10}")
        if perm:
            p = r.get("permutations") or {}
            line += f" {fmt_value(p.get('heads_mean_similarity')):>9} {fmt_value(p.get('mlp_mean_correlation')):>8}"
        lines.append(line)
    return "\n".join(lines)


def record_rotation(plan: RotationPlan, layer_results: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any],
                    cosines: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Append one ledger row per layer (when a ledger is given), write --spec-out, build the
    table. Returns {"run_id", "layers": merged rows, "global", "ledger", "spec", "table", ...}."""
    merged = merge_results(plan, layer_results, pooled, cosines)
    ledger_file = None
    if plan.ledger:
        from lib.store.ledgers import append_rows

        ledger_file = str(append_rows(plan.ledger, "rotations", ledger_rows(plan, merged)))
    spec = str(write_rotation_spec(plan, merged, pooled)) if plan.spec_out else None
    n_cos = min((r.get("n_cosine_tokens") or 0) for r in merged)
    notes = [f"{plan.n_tokens} paired tokens from {len(plan.pairs)} sample(s)"
             + (f" ({plan.unpaired_student} student / {plan.unpaired_teacher} teacher sample(s) unpaired)"
                if plan.unpaired_student or plan.unpaired_teacher else "")
             + ("; position 0 excluded" if plan.options.exclude_position0 else "; position 0 included"),
             f"cosines after rotation over {n_cos} token(s)" + ("" if n_cos >= plan.n_tokens else
                                                                  f" (every {plan.cosine_stride}th; --cosine-tokens 0 for all)"),
             f"pooled rotation Q → {pooled['rotation_path']}"]
    table = format_rotation_table(merged) + "\n" + "\n".join(notes)
    return {"run_id": plan.run_id, "layers": merged, "global": dict(pooled), "ledger": ledger_file, "spec": spec,
            "table": table, "n_tokens": plan.n_tokens, "n_samples": len(plan.pairs), "output_dir": plan.output_dir}


def run_rotation(student_index: str | os.PathLike, teacher_index: str | os.PathLike, layers: Sequence[str] | None,
                 output_dir: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                 spec_out: str | os.PathLike | None = None, options: RotateOptions = RotateOptions(),
                 run_id: str | None = None) -> dict[str, Any]:
    """The whole rotate job in-process (tests, notebooks, benchmarks): checksums first, then
    plan → per-layer solve → pool → (PCA cosines) → record. Same outputs as the rotate flow."""
    from lib.store.validation import require_valid

    require_valid([student_index, teacher_index])
    plan = plan_rotation(student_index, teacher_index, layers, output_dir, ledger=ledger, spec_out=spec_out,
                         options=options, run_id=run_id)
    results = [solve_layer(plan, layer) for layer in plan.layers]
    pooled = pool_rotation(plan, results)
    cosines = [pca_cosines(plan, layer) for layer in plan.layers] if plan.pca else []
    return record_rotation(plan, results, pooled, cosines)
