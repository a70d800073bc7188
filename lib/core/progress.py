"""Stage progress on the console: one line (or bar) per stage with counts and time left.

Prefect-free, and off unless a console asked for it (`enable()`, done by the `tourguide` CLI), so
library calls, tests and workers print nothing. Stages (capture, rotate, fold, qa) call

    with stage("capture student", total=len(batches), unit="sample") as st:
        ...; st.advance(len(batch))

On a terminal this is a live rich bar (rich ships with Prefect) or a plain carriage-return line;
in a log or a pipe it is one summary line when the stage ends, so captured output stays short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_STREAM: TextIO | None = None


def enable(stream: TextIO | None = None) -> None:
    global _STREAM
    _STREAM = stream or sys.stderr


def disable() -> None:
    global _STREAM
    _STREAM = None


def enabled() -> bool:
    return _STREAM is not None


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Stage:
    """Counts work done in one stage; renders through rich, a plain line, or nothing."""

    def __init__(self, name: str, total: int, unit: str, stream: TextIO | None):
        self.name, self.total, self.unit, self.stream = name, max(int(total), 0), unit, stream
        self.done = 0
        self.t0 = time.monotonic()
        self._live: Any = None
        self._task: Any = None
        tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        if tty:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)
            except ImportError:  # plain carriage-return line below
                pass
            else:
                self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn(unit), TimeElapsedColumn(), TextColumn("elapsed,"),
                                      TimeRemainingColumn(), TextColumn("left"), console=Console(file=stream), transient=False)
                self._live.start()
                self._task = self._live.add_task(name, total=self.total or None)
        self._tty = tty

    def eta(self) -> float | None:
        if not self.done or not self.total:
            return None
        elapsed = time.monotonic() - self.t0
        return elapsed / self.done * (self.total - self.done)

    def line(self) -> str:
        elapsed = _fmt_s(time.monotonic() - self.t0)
        if self.done >= self.total:
            return f"{self.name}: {self.done}/{self.total} {self.unit} in {elapsed}"
        eta = self.eta()
        return f"{self.name}: {self.done}/{self.total} {self.unit}, {elapsed}" + (
            f", ~{_fmt_s(eta)} left" if eta is not None else "")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._live is not None:
            self._live.update(self._task, advance=n)
        elif self._tty and self.stream is not None:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def close(self, failed: bool = False) -> None:
        if self._live is not None:
            self._live.stop()
            return
        if self.stream is None:
            return
        end = " (stopped)" if failed else ""
        self.stream.write(("\r" if self._tty else "") + self.line() + end + ("\x1b[K" if self._tty else "") + "\n")
        self.stream.flush()


@contextmanager
def stage(name: str, total: int, unit: str = "item") -> Iterator[Stage]:
    """A progress display for one stage; a no-op object when progress is not enabled."""
    st = Stage(name, total, unit, _STREAM)
    try:
        yield st
    except BaseException:
        st.close(failed=True)
        raise
    st.close()
