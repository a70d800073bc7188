"""`tourguide demo`: the whole pipeline, offline, on the built-in demo teacher and a planted student."""

from __future__ import annotations

import argparse
import time

from lib.pipeline.summary import format_summary  # shared with `tourguide pipeline` (imports nothing heavy)


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


def run(args: argparse.Namespace) -> int:
    from flows.console import load_flow

    demo_flow = load_flow("demo")

    t0 = time.perf_counter()
    summary = demo_flow(run_id=args.run_id, runs_root=args.runs_root, noise=args.noise, seed=args.seed,
                        limit=args.limit, max_length=args.max_length, batch_size=args.batch_size)
    print(format_summary(summary, time.perf_counter() - t0))
    return 0
