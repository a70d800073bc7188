"""`tourguide report --run-id ID --runs-root runs`: report.md + figures from a run's ledgers."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="render runs/<id>/report.md and figures from the run's metrics and rotations ledgers",
        description="Read runs/<run-id>/manifest.json and the metrics (and rotations) ledgers; write report.md "
                    "(summary per variant × metric for the latest night, per-layer tables, what changed since the "
                    "previous night) and seaborn figures under figures/ (metric_trends.png, cosine_per_layer.png, "
                    "residual_rms.png). As a Prefect flow (--flow, or whenever PREFECT_API_URL is set) it also "
                    "publishes the report as a markdown artifact and the tables as table artifacts.",
        epilog="The seed's --mock flag is not needed (and not accepted): the report always reads the real "
               "ledgers, and a run without metrics yet gets a report that says so.")
    p.add_argument("--run-id", required=True, help="the run to report on (a folder under --runs-root)")
    p.add_argument("--runs-root", default="runs", help="folder holding the runs (default: runs)")
    p.add_argument("--flow", action="store_true",
                   help="run as a Prefect flow and publish artifacts (the default when PREFECT_API_URL is set)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.store.runs import load_run

    load_run(args.runs_root, args.run_id)  # fail fast (never scaffolded → clear error), before Prefect starts
    if args.flow or os.environ.get("PREFECT_API_URL"):
        from flows.console import load_flow

        report_flow = load_flow("report")

        result = report_flow(run_id=args.run_id, runs_root=args.runs_root)
    else:
        from lib.qa.report import render_report

        result = render_report(args.runs_root, args.run_id).model_dump(mode="json")
    print(f"report: {result['report_path']} (latest night {result['latest_night'] or '—'}, "
          f"{len(result['summary'])} variant(s), {len(result['figures'])} figure(s))")
    for row in result["summary"]:
        vals = ", ".join(f"{k}={v:.6g}" for k, v in row.items() if k != "variant" and v is not None)
        print(f"  {row['variant']}: {vals}")
    return 0
