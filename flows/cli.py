"""The `tourguide` command line: `tourguide <command> --help` explains each command.

Quick read-only commands (analyze, validate) call `lib` directly; long jobs run as Prefect
flows. Every command uses the server `tourguide server start` left running (its pid file under the
Prefect home), or PREFECT_API_URL when set; otherwise Prefect starts a throwaway local API in each
process (~15-30 s), and the command says so in one line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}
COMMANDS = ["capture", "validate", "analyze", "rotate", "fold", "scaffold", "qa", "report", "demo", "pipeline",
            "server"]
# Commands that always run a flow (scaffold/report run one with --flow; validate never without a server).
FLOW_COMMANDS = {"capture", "rotate", "fold", "qa", "demo", "pipeline"}
QUICK_COMMANDS = {"analyze", "server"}  # never run a flow
# A first throwaway API migrates a fresh database: Prefect's 20 s default fails new users' first command.
EPHEMERAL_TIMEOUT_S = "120"


def connect(args: argparse.Namespace) -> str | None:
    """Use the running local server (sets PREFECT_API_URL): "server"; or "throwaway" when this
    command will start Prefect's throwaway API; None when it runs no flow."""
    from lib.store.server import connect as use_running_server

    if args.command in QUICK_COMMANDS:
        return None
    if use_running_server() is not None:
        return "server"
    if args.command in FLOW_COMMANDS or getattr(args, "flow", False):
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_TIMEOUT_S)
        return "throwaway"
    return None


def _ephemeral_failed(args: argparse.Namespace) -> None:
    timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_TIMEOUT_S)
    print(f"tourguide {args.command}: error: Prefect's throwaway API did not start within {timeout} s (a first "
          "start migrates its database; the machine may be loaded). Fix: run `tourguide server start` once (it "
          "waits as long as needed) and re-run this command, or raise "
          "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tourguide",
        description="Capture, compare, align and fold HF causal LMs over a frozen tour-stop corpus, offline.",
        epilog="Start with `tourguide demo`. Each command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"flows.commands.{name}").register(sub)
    from flows.console import add_verbose_flag

    for name, command_parser in sub.choices.items():
        if name not in QUICK_COMMANDS:
            add_verbose_flag(command_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        sys.exit(0)
    from flows.console import Console
    from lib.core.errors import TourGuideError

    mode = connect(args)
    console = Console(args, throwaway=mode == "throwaway")  # attaches when the command loads its flow
    try:
        if mode:
            console.quiet_environment()
        code = args.func(args)
    except TourGuideError as exc:
        print(f"tourguide {args.command}: error: {console.failure(str(exc), exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            # A full or read-only disk is the user's to fix, not a bug: one line, no traceback.
            print(f"tourguide {args.command}: error: {exc.filename or ''}: {exc.strerror}. Fix: free space on that "
                  "disk, make the path writable (or readable), or pass another --output-dir; everything written "
                  "before is complete, and the same command resumes.", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, RuntimeError) and "ephemeral Prefect API" in str(exc):
            _ephemeral_failed(args)
        if console.log_path is None or console.verbose:
            raise  # no flow ran (a bug before Prefect started), or the user asked for the traceback
        # A failure inside a flow: one line; the traceback is in the log (and the run's state in the UI).
        print(f"tourguide {args.command}: error: {console.failure(f'{type(exc).__name__}: {exc}', exc)}",
              file=sys.stderr)
        sys.exit(1)
    finally:
        console.close()
    sys.exit(int(code or 0))


if __name__ == "__main__":
    main()
