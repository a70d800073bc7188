"""Write-behind for the fold: a `ShardedWriter`'s calls run in order on one background thread,
so writing (and the fsync at each shard's end) overlaps the next tensor's math.

The queue is bounded in bytes (`max_bytes`; one item is always admitted, so a whole tensor bigger
than the bound still goes through, alone): the memory the overlap costs is at most that bound
plus one tensor. An error on the writer thread is re-raised on the caller's thread at its next
call; `abort` stops the thread and removes the partial shard.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from lib.fold.checkpoint_io import CheckpointReader, ShardedWriter


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


class WriteBehind:
    """Queue `write` / `copy_raw` / `begin` + `write_part` for `writer` on a background thread."""

    def __init__(self, writer: ShardedWriter, max_bytes: int) -> None:
        self.writer, self.max_bytes = writer, max(1, int(max_bytes))
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._queued = 0  # bytes held by queued jobs
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._skip = False  # set by abort: queued jobs are dropped, not run
        self._thread = threading.Thread(target=self._run, name="fold-write-behind", daemon=True)
        self._thread.start()

    @property
    def files(self) -> list[str]:
        """The shard file names (ShardedWriter.files)."""
        return self.writer.files

    # --- the caller's side ---------------------------------------------------------------------
    def write(self, name: str, tensor: Any) -> None:
        self._put(lambda: self.writer.write(name, tensor), _nbytes(tensor))

    def copy_raw(self, name: str, reader: CheckpointReader, source_name: str) -> None:
        self._put(lambda: self.writer.copy_raw(name, reader, source_name), 0)

    def begin(self, name: str) -> None:
        self._put(lambda: self.writer.begin(name), 0)

    def write_part(self, tensor: Any) -> None:
        self._put(lambda: self.writer.write_part(tensor), _nbytes(tensor))

    def close(self) -> dict[str, Any]:
        """Wait for every queued write, then finish the last shard and the index."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self.writer.close()

    def abort(self) -> None:
        """Skip what is still queued, stop the thread and remove the partial shard."""
        self._skip = True
        self._stop()
        self.writer.abort()

    def _put(self, job: Callable[[], None], nbytes: int) -> None:
        with self._cond:
            while self._error is None and self._jobs and self._queued + nbytes > self.max_bytes:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._jobs.append((job, nbytes))
            self._queued += nbytes
            self._cond.notify_all()

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    # --- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes = self._jobs[0]
            try:
                if self._error is None and not self._skip:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
            with self._cond:
                self._jobs.popleft()
                self._queued -= nbytes
                self._cond.notify_all()
