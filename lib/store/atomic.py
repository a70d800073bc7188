"""Crash-safe file writes: temp file in the same folder + fsync + rename, and an advisory lock.

Why: a reader (or a resumed run) must never see half a file under its final name, and two
writers into one folder must not interleave index lines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None], sync_dir: bool = True) -> Path:
    """Call `writer(tmp_path)` to fill a temp file beside `path`, fsync it and rename it into place.

    The temp name starts with '.tmp-' so that readers and globbing skip it; on any error the
    temp file is removed and the final path is left untouched. `sync_dir=False` leaves the
    folder's fsync to the caller (one fsync for a batch of renames).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


class AtomicFile:
    """A temp file beside `path`, written through its descriptor `fd`: `commit()` fsyncs it and
    renames it into place, `discard()` removes it (the final path is untouched until commit).
    For writers that stream a file piece by piece (lib.store.stream_writer.StreamWriter).
    `fsync=False` keeps the rename atomic for readers but skips durability (scratch files that
    are read at once and never survive a crash, like the vLLM worker's spool). `sync_every` > 0
    flushes the data to disk after each that many bytes, so `commit` waits only for the tail
    (a writer on a background thread then overlaps nearly all of the disk time)."""

    def __init__(self, path: str | os.PathLike, sync_dir: bool = True, fsync: bool = True, sync_every: int = 0):
        self.path = Path(path)
        self.sync_dir = sync_dir and fsync
        self.fsync = fsync
        self.sync_every = sync_every if fsync else 0
        self._unsynced = 0
        self.fd, self.tmp = tempfile.mkstemp(prefix=f".tmp-{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(self.fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
        except BaseException:
            self.discard()
            raise

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._unsynced += len(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        if self.sync_every and self._unsynced >= self.sync_every:
            os.fdatasync(self.fd)
            self._unsynced = 0

    def commit(self) -> Path:
        if self.fsync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)
        if self.sync_dir:
            fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def write_bytes_atomic(path: str | os.PathLike, data: Any, sync_dir: bool = True, fsync: bool = True) -> Path:
    """`write_atomic` for bytes (or a list of buffers, written in order without joining them),
    written and fsynced through one descriptor (see AtomicFile for `fsync=False`)."""
    out = AtomicFile(path, sync_dir, fsync)
    try:
        for part in ([data] if isinstance(data, bytes | bytearray | memoryview) else data):
            out.write(part)
        return out.commit()
    except BaseException:
        out.discard()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def append_line_durable(path: str | os.PathLike, line: str) -> None:
    """Append one line (newline added); see `append_lines_durable`."""
    append_lines_durable(path, [line])


def append_lines_durable(path: str | os.PathLike, lines: list[str]) -> None:
    """Append lines (newlines added) with a single write() and fsync: O_APPEND keeps concurrent
    appenders from interleaving inside a line. A short write (disk full) is taken back and
    raised as ENOSPC, so the file never ends in a torn line."""
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, data)
        if n != len(data):
            os.ftruncate(fd, os.fstat(fd).st_size - n)
            raise OSError(errno.ENOSPC, f"No space left on device (appended {n} of {len(data)} bytes; taken back)",
                          os.fspath(path))
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created if needed) for the block."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """HF-style JSON (indent 2, sorted keys, trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
