"""`tourguide demo`: the whole pipeline, offline, on the built-in demo teacher and a planted student."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the offline demo: plant known transforms into a student, recover them, fold, gate, QA, report",
        description="Builds (once, cached) a small Qwen3 demo teacher trained on the corpus, derives a student = "
                    "teacher with a planted global residual rotation, GQA-consistent head permutation, MLP neuron "
                    "permutation and small weight noise, then runs the pipeline (scaffold → capture → transports → "
                    "fold → equivalence gate → QA → report) under Prefect's ephemeral API, and prints a summary. "
                    "A second identical run is served mostly from caches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-id", default="demo", help="run folder name under --runs-root")
    p.add_argument("--runs-root", default="runs", help="where run folders live")
    p.add_argument("--noise", type=float, default=0.01, help="student weight noise, relative to each tensor's RMS")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted transforms and noise")
    p.add_argument("--limit", type=int, default=None, help="use only the first N blurbs (default: all 200)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per blurb")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (fewer, larger cached tasks)")
    p.set_defaults(func=run)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def format_summary(s: dict[str, Any], seconds: float) -> str:
    lines = [f"OfflineTourGuide demo — run {s['run_id']} ({s['run_dir']}), {seconds:.0f} s", ""]
    rot = s["rotate"]
    lines.append(f"Transports: {rot['n_tokens']} paired tokens from {rot['n_samples']} samples")
    lines.append(f"  {'layer':<16} {'cos before':>10} {'cos after':>10} {'cos global':>10}")
    for r in rot["layers"]:
        lines.append(f"  {r['layer']:<16} {_fmt(r.get('cosine_before')):>10} {_fmt(r.get('cosine_after')):>10} "
                     f"{_fmt(r.get('cosine_global')):>10}")
    rec = s["recovery"]
    lines += ["", "Recovery of the planted transforms (solved vs inverse of planted):",
              f"  rotation: max |ΔQ| {_fmt(rec['rotation_max_abs_err'])}, relative ‖ΔQ‖_F {_fmt(rec['rotation_rel_fro_err'])}",
              f"  head permutation accuracy {_fmt(rec['head_accuracy'])}, neuron permutation accuracy {_fmt(rec['neuron_accuracy'])}"]
    g = s.get("gate") or {}
    lines += ["", f"Equivalence gate ({g.get('status', 'not run')}): max|Δlogit| {_fmt(g.get('max_abs_logit_diff'))}, "
                  f"mean KL {_fmt(g.get('mean_kl'))}, top-1 agreement {_fmt(g.get('top1_agreement'))}, "
                  f"hidden cosine min {_fmt(g.get('hidden_cosine_min'))}"]
    lines += ["", "QA (teacher vs each variant; hidden cosine = mean over layers, common basis):",
              f"  {'variant':<18} {'logit KL':>10} {'surprisal':>10} {'hidden cos':>10} {'RMS ratio':>10}"]
    for r in (s.get("qa") or {}).get("results", []):
        h = r.get("headline", {})

        def mean_of(prefix: str) -> float | None:
            vals = [v for k, v in h.items() if k.startswith(prefix + "[")]
            return sum(vals) / len(vals) if vals else h.get(prefix)

        lines.append(f"  {r['variant']:<18} {_fmt(h.get('logit_kl')):>10} {_fmt(h.get('surprisal')):>10} "
                     f"{_fmt(mean_of('hidden_state_cosine')):>10} {_fmt(mean_of('residual_rms_ratio')):>10}")
    lines += ["", f"Report: {s.get('report')}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from flows.demo import demo_flow

    t0 = time.perf_counter()
    summary = demo_flow(run_id=args.run_id, runs_root=args.runs_root, noise=args.noise, seed=args.seed,
                        limit=args.limit, max_length=args.max_length, batch_size=args.batch_size)
    print(format_summary(summary, time.perf_counter() - t0))
    return 0
