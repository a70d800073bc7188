"""The console summary of a pipeline run, shared by `tourguide pipeline` and `tourguide demo`:
per-layer cosines before and after alignment, the equivalence gate (or why there was no fold),
the QA table (teacher vs each variant) and the report path. The demo adds its recovery block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def _pca(rows: Sequence[dict[str, Any]]) -> tuple[int, int, int] | None:
    """(k, d_student, d_teacher) when the transports were solved in a PCA space."""
    for r in rows:
        if r.get("pca_dim"):
            return int(r["pca_dim"]), int(r["d_student"]), int(r["d_teacher"])
    return None


def format_summary(s: dict[str, Any], seconds: float, title: str = "OfflineTourGuide demo",
                   header: Sequence[str] = ()) -> str:
    """The summary of `pipeline_flow`'s result `s` (plus `s["recovery"]` for the demo)."""
    lines = [f"{title} — run {s['run_id']} ({s['run_dir']}), {seconds:.0f} s", *header, ""]
    rot = s["rotate"]
    pca = _pca(rot["layers"])
    lines.append(f"Transports: {rot['n_tokens']} paired tokens from {rot['n_samples']} samples"
                 + (f" (PCA: student {pca[1]} and teacher {pca[2]} dims → {pca[0]})" if pca else ""))
    lines.append(f"  {'layer':<16} {'cos before':>10} {'cos after':>10} {'cos global':>10}")
    for r in rot["layers"]:
        lines.append(f"  {r['layer']:<16} {fmt(r.get('cosine_before')):>10} {fmt(r.get('cosine_after')):>10} "
                     f"{fmt(r.get('cosine_global')):>10}")
    rec = s.get("recovery")
    if rec:
        lines += ["", "Recovery of the planted transforms (solved vs inverse of planted):",
                  f"  rotation: max |ΔQ| {fmt(rec['rotation_max_abs_err'])}, relative ‖ΔQ‖_F {fmt(rec['rotation_rel_fro_err'])}",
                  f"  head permutation accuracy {fmt(rec['head_accuracy'])}, neuron permutation accuracy {fmt(rec['neuron_accuracy'])}"]
    g = s.get("gate") or {}
    if not g and pca:
        lines += ["", f"Fold and equivalence gate: skipped (--pca-dim {pca[0]}: a PCA map is not a rotation of the "
                      "student, so nothing folds exactly); QA compares the student through the PCA map "
                      f"({(rot.get('global') or {}).get('rotation_path')})"]
    else:
        lines += ["", f"Equivalence gate ({g.get('status', 'not run')}): max|Δlogit| {fmt(g.get('max_abs_logit_diff'))}, "
                      f"mean KL {fmt(g.get('mean_kl'))}, top-1 agreement {fmt(g.get('top1_agreement'))}, "
                      f"hidden cosine min {fmt(g.get('hidden_cosine_min'))}"]
    lines += ["", "QA (teacher vs each variant; hidden cosine = mean over layers, common basis):",
              f"  {'variant':<18} {'logit KL':>10} {'surprisal':>10} {'hidden cos':>10} {'RMS ratio':>10}"]
    for r in (s.get("qa") or {}).get("results", []):
        h = r.get("headline", {})

        def mean_of(prefix: str) -> float | None:
            vals = [v for k, v in h.items() if k.startswith(prefix + "[")]
            return sum(vals) / len(vals) if vals else h.get(prefix)

        lines.append(f"  {r['variant']:<18} {fmt(h.get('logit_kl')):>10} {fmt(h.get('surprisal')):>10} "
                     f"{fmt(mean_of('hidden_state_cosine')):>10} {fmt(mean_of('residual_rms_ratio')):>10}")
    lines += ["", f"Report: {s.get('report')}"]
    return "\n".join(lines)
