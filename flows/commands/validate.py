"""`tourguide validate INDEX...`: re-hash every shard; exit non-zero naming each bad one."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="re-hash every shard of one or more metadata.jsonl indexes",
        description="Re-hash every shard listed in the given metadata.jsonl files (or capture folders) on all "
                    "cores and compare with the recorded sha256 and size. Prints a table; exits 1 naming every bad "
                    "shard. Answers directly (no Prefect start-up) unless PREFECT_API_URL is set, in which case it "
                    "runs as a flow visible in the UI.")
    p.add_argument("index", nargs="+", help="metadata.jsonl file(s) or capture folder(s)")
    p.add_argument("--workers", type=int, default=None, help="hashing threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="print only bad shards and the summary line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.store.validation import format_validation_table, validate_indexes

    if os.environ.get("PREFECT_API_URL"):
        from flows.console import load_flow

        validate_flow = load_flow("validate")

        checks = validate_flow(list(args.index))
        from lib.store.validation import ShardCheck

        checks = [ShardCheck(**c) for c in checks]
    else:
        checks = validate_indexes(args.index, workers=args.workers)
    shown = [c for c in checks if not c.ok] if args.quiet else checks
    print(format_validation_table(shown) if shown else f"{len(checks)} shard(s), 0 bad")
    return 1 if any(not c.ok for c in checks) else 0
