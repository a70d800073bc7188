"""The `tourguide` command line: `tourguide <command> --help` explains each command.

Quick read-only commands (analyze, validate) call `lib` directly; long jobs run as Prefect
flows (with no PREFECT_API_URL set, Prefect starts a throwaway local API: ~15 s; run
`prefect server start` and export PREFECT_API_URL to make every command fast and visible).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}
COMMANDS = ["capture", "validate", "analyze", "rotate", "fold", "scaffold", "qa", "report", "demo", "pipeline"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tourguide",
        description="Capture, compare, align and fold HF causal LMs over a frozen tour-stop corpus, offline.",
        epilog="Start with `tourguide demo`. Each command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"flows.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        sys.exit(0)
    from lib.core.errors import TourGuideError

    try:
        code = args.func(args)
    except TourGuideError as exc:
        print(f"tourguide {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        # A full or read-only disk is the user's to fix, not a bug: one line, no traceback.
        print(f"tourguide {args.command}: error: {exc.filename or ''}: {exc.strerror}. Fix: free space on that disk, "
              "make the path writable (or readable), or pass another --output-dir; everything written before is "
              "complete, and the same command resumes.", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))


if __name__ == "__main__":
    main()
