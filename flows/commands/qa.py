"""`tourguide qa --config CONFIG`: the nightly QA flow over every variant of an eval config."""

from __future__ import annotations

import argparse

from flows.commands.fanout import add_fanout_flags, fanout_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "qa", help="nightly QA: capture every variant of an eval config, compare with the teacher, report",
        description="For every checkpoint variant in the eval config (JSON or TOML; start from "
                    "deployments/eval_template.json): capture over the run's frozen dataset snapshot (served from the "
                    "capture cache when nothing changed) → validate checksums → metrics against the teacher "
                    "(logit_kl, hidden_state_cosine in a common basis, residual_rms, surprisal/perplexity) → rows in "
                    "runs/<run_id>/ledgers/metrics/ → report.md, figures and Prefect artifacts. The run must be "
                    "scaffolded first (`tourguide scaffold --run-id …`). A failing variant is reported and the others "
                    "keep their rows; the command then exits 2.")
    p.add_argument("--config", required=True, help="eval config, .json or .toml (relative paths in it are taken "
                                                    "from the working directory)")
    p.add_argument("--night", default=None, help="label of this QA night in the ledger (default: today's UTC date)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="render the report afterwards (default; --no-report skips it)")
    add_fanout_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.qa.eval_config import load_eval_config
    from lib.store.runs import verify_snapshot

    # Fail fast on bad input, before Prefect starts its (throwaway) API and before any write.
    cfg = load_eval_config(args.config)
    verify_snapshot(cfg.runs_root, cfg.run_id)
    fanout = fanout_from_args(args)
    from flows.console import load_flow
    from flows.runners import on_runner

    qa_flow = load_flow("qa")

    out = on_runner(qa_flow, fanout)(config=args.config, night=args.night, report=args.report)
    for r in out["results"]:
        head = ", ".join(f"{k}={v:.6g}" for k, v in r["headline"].items() if "[" not in k)
        print(f"{r['variant']}: {r['n_rows']} row(s), {r['n_pairs']} sample(s), {r['n_tokens']} tokens; {head}")
    if out["report"]:
        print(f"report: {out['report']['report_path']}")
    return 0
