"""The `tourguide` console: quiet by default, everything in a log file, one line on failure.

By default a command that runs flows shows one progress line per stage (lib.core.progress), then
warnings, errors and its summary. Prefect's INFO lines still go to the API (the UI's log tab)
and, with everything else Prefect logs, to a log file for the command:
`<runs_root>/<run_id>/logs/<command>.log` when the command names a run, else
`<output-dir's parent>/logs/<command>-<output-dir name>.log`. `--verbose` prints them on the
console again (and the HF load/save bars). A failure prints one line: the message, the Prefect
step (task or flow run) that failed, and the log path; the traceback goes into the log.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path


class _FailedStep(logging.Handler):
    """Remembers the last Prefect task or flow run that logged an error (its "Finished in state
    Failed" line): the step a failure message names."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.step: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if name and (self.step is None or getattr(record, "task_run_name", None)):
            self.step = name  # the innermost run that failed first wins over the flows it fails in turn


class _RunFormatter(logging.Formatter):
    """Prefect's console layout (`Task run 'capture-x' - message`) for the log file."""

    def format(self, record: logging.LogRecord) -> str:
        task, flow = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.run = f"Task run {task!r}" if task else f"Flow run {flow!r}" if flow else record.name
        return super().format(record)


def _not_a_failure_report(record: logging.LogRecord) -> bool:
    """Console filter: Prefect's failure records (tracebacks, "Finished in state Failed", the
    on_failure hook's line) are left to the log file; the CLI prints the failure as one line."""
    if record.exc_info or getattr(record, "tourguide_failure", False):
        return False
    return not (record.levelno >= logging.ERROR and record.getMessage().startswith(("Finished in state",
                                                                                      "Encountered exception")))


def log_path_for(args: argparse.Namespace) -> Path:
    run_id = getattr(args, "run_id", None)
    if run_id and getattr(args, "runs_root", None):
        return Path(args.runs_root) / run_id / "logs" / f"{args.command}.log"
    if getattr(args, "config", None) and args.command == "qa":
        return Path(args.config).resolve().parent / "logs" / "qa.log"
    out = getattr(args, "output_dir", None)
    if out:
        out_path = Path(out).resolve()
        return out_path.parent / "logs" / f"{args.command}-{out_path.name}.log"
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / "logs" / f"{args.command}.log"


THROWAWAY_HINT = ("tourguide: no Prefect server running, starting a throwaway one for this command "
                  "(`tourguide server start` makes later commands faster)")
_ACTIVE: Console | None = None


def load_flow(name: str):
    """`flows.<name>.<name>_flow`, imported once the command's own checks passed: the console
    attaches its log file (and says a throwaway API starts) only then, so bad input fails before
    Prefect is imported and before anything is written."""
    if _ACTIVE is not None:
        _ACTIVE.flow_starts()
    return getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")


class Console:
    """Set up before the command imports prefect/transformers (`quiet_environment`), attach the
    log file once a flow is about to run (`flow_starts`), and format failures (`failure`)."""

    def __init__(self, args: argparse.Namespace, throwaway: bool = False):
        global _ACTIVE
        self.args = args
        self.verbose = bool(getattr(args, "verbose", False))
        self.throwaway = throwaway
        self.log_path: Path | None = None
        self.step = _FailedStep()
        self._started = False
        self._undo: list = []  # what close() reverts, newest first
        _ACTIVE = self

    def flow_starts(self) -> None:
        if self._started:
            return
        self._started = True
        if self.throwaway:
            print(THROWAWAY_HINT, file=sys.stderr)
        self.attach()

    def quiet_environment(self) -> None:
        from lib.core import progress

        progress.enable(sys.stderr)
        self._undo.append(progress.disable)
        if self.verbose:
            return
        # Read at import time by Prefect's logging config and by huggingface_hub/transformers.
        for key in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS"):
            if key not in os.environ:
                os.environ[key] = "WARNING" if key.startswith("PREFECT") else "1"
                self._undo.append(lambda key=key: os.environ.pop(key, None))

    def attach(self) -> None:
        """Send every Prefect log record (all levels Prefect emits) to the command's log file."""
        import prefect.main  # noqa: F401  (configures Prefect's logging; ours must come after)

        path = log_path_for(self.args)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            return  # an unwritable place must not stop the command; errors still reach the console
        handler.setFormatter(_RunFormatter("%(asctime)s | %(levelname)-7s | %(run)s - %(message)s"))
        handler.setLevel(logging.DEBUG)
        handler.stream.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} tourguide "
                             f"{' '.join(sys.argv[1:])}\n")
        logger = logging.getLogger("prefect")
        logger.addHandler(handler)
        self._undo.append(lambda: (logger.removeHandler(handler), handler.close()))
        if not self.verbose:
            for console in logging.getLogger().handlers:
                if type(console).__name__ == "PrefectConsoleHandler":
                    # also when Prefect's logging was configured before the environment said so
                    self._undo.append(lambda c=console, level=console.level: (c.setLevel(level),
                                                                              c.removeFilter(_not_a_failure_report)))
                    console.setLevel(max(console.level, logging.WARNING))
                    console.addFilter(_not_a_failure_report)
        logger.addHandler(self.step)
        self._undo.append(lambda: logger.removeHandler(self.step))
        self.log_path = path

    def close(self) -> None:
        """Undo what this console changed (handlers, levels, progress, environment), so that a
        caller running several commands in one process (tests, notebooks) starts clean each time."""
        global _ACTIVE
        while self._undo:
            self._undo.pop()()
        if _ACTIVE is self:
            _ACTIVE = None

    def failure(self, message: str, exc: BaseException | None = None) -> str:
        """`message` plus the failed step and the log path; the traceback goes into the log."""
        if exc is not None and self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write("".join(traceback.format_exception(exc)))
        where = []
        if self.step.step:
            where.append(f"failed step: {self.step.step}")
        if self.log_path is not None:
            where.append(f"log: {self.log_path}")
        return message + (f" [{'; '.join(where)}]" if where else "")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="print Prefect's log lines and the HF load/save bars on the console too "
                             "(they always go to the command's log file and the Prefect API)")
