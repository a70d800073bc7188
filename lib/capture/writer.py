"""A bounded background writer: a batch's shards are serialised, hashed, written, fsynced and
indexed on one thread while the caller computes the next batch.

Why one thread and a bound: the index must get its rows in the order batches were handed off
(one FIFO consumer keeps that), and every batch in flight holds its tensors in memory, so at
most `max_pending` batches (default 2: one being written, one waiting) are held; `submit`
blocks beyond that, which keeps peak memory independent of the number of samples.

Crash safety is unchanged: each job is a full `commit_shards` (shard bytes durable, then their
rows), so a crash at any point leaves at most unindexed shards that a resume rewrites. The
first failure is sticky: the writer stops taking work, and `submit`/`close` re-raise the
original exception (its type and errno kept, so callers' `except OSError` still work) with a
note naming the shards that were not committed.

Used by `lib.capture.run.run_capture`. The capture flow's `capture_batch` task stays
synchronous on purpose: it is cached across runs, and a cache record must only exist once its
rows are committed (a task that returned after handing off could be cached, then lose its
write to a crash; the next run would trust the cache). Overlap there would need the forward
and the commit as separate tasks, which the per-batch cache key does not model today.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

_STOP = object()


class ShardWriter:
    """`with ShardWriter() as w: w.submit(job, shards)`; `job()` commits a batch and returns its rows.

    `rows` collects the jobs' results in submission order. Leaving the block waits for queued
    jobs; when the block itself raised, that exception wins (the writer's, if any, is noted).
    """

    def __init__(self, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        # the worker's current job counts as pending: the queue holds max_pending - 1 more
        self._slots = threading.BoundedSemaphore(max_pending)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self.rows: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._work, name="capture-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, shards = item
            try:
                if self._error is None:  # after a failure, later batches are dropped unwritten
                    self.rows.extend(job())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                exc.add_note(f"capture writer: committing shard(s) {', '.join(shards)} failed; "
                             f"none of them was indexed after the failure, re-run the same command to resume")
                self._error = exc
            finally:
                self._slots.release()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], Sequence[dict[str, Any]]], shards: Sequence[str]) -> None:
        """Queue `job` (blocks while `max_pending` batches are in flight); raises a prior failure."""
        self._raise_if_failed()
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            self._raise_if_failed()
        self._jobs.put((job, list(shards)))

    def close(self) -> list[dict[str, Any]]:
        """Wait for every queued job; re-raise the first failure; return all rows in order."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._raise_if_failed()
        return self.rows

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        # The caller failed (e.g. a forward raised): batches already handed off are complete and
        # worth keeping for a resume, so they are still committed before the error propagates.
        try:
            self.close()
        except BaseException as werr:  # noqa: BLE001
            exc.add_note(f"the capture writer also failed: {werr!r}")
