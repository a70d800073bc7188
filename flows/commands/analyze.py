"""`tourguide analyze FILE|DIR`: per-layer mean / max |activation| of captured shards."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="per-layer mean / max |activation| table of a shard, a legacy .pt file or a capture folder",
        description="Summarise act/* tensors per hook point. Reads safetensors shards, or legacy .pt files with "
                    "torch.load(weights_only=True) only. Python API: from lib.analysis import "
                    "summarize_activation_file, format_summary_table.")
    p.add_argument("path", help="a .safetensors shard, a legacy .pt file, or a folder of shards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.store.analysis import format_summary_table, summarize_activation_file

    print(format_summary_table(summarize_activation_file(args.path)))
    return 0
