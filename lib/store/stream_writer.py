"""Writing one safetensors file from a planned layout, piece by piece (lib.store.safetensors_io
lays out the bytes): each tensor whole, in row pieces, or copied as a raw byte range from another
file with os.copy_file_range — so peak memory is one piece, never the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.core.dtypes import ITEMSIZE
from lib.core.errors import BadInputError
from lib.store.atomic import AtomicFile
from lib.store.safetensors_io import Header, Layout, header_bytes, open_data, tensor_bytes


class StreamWriter:
    """One safetensors file written from a planned layout: the header first, then each tensor in
    plan order (`write`, `copy_raw` from another file, or `begin` + `write_part` in row pieces),
    into a temp file that `close` renames into place (`abort` removes it). Tensors must match the
    plan's dtype and shape; a tensor begun but not completed fails `close`."""

    def __init__(self, path: str | os.PathLike, layout: Layout, metadata: Mapping[str, str] | None = None, *,
                 sync_dir: bool = True, sync_every: int = 0):
        self.path = Path(path)
        self.layout = [(name, code, tuple(int(s) for s in shape)) for name, code, shape in layout]
        head = header_bytes(self.layout, metadata)
        self.out = AtomicFile(self.path, sync_dir, sync_every=sync_every)  # see AtomicFile
        self.pos = 0
        self._left = 0  # bytes still owed to the tensor begun by `begin`
        try:
            self.out.write(head)
        except BaseException:
            self.out.discard()
            raise

    def _next(self, name: str, code: str, shape: tuple[int, ...]) -> None:
        if self._left:
            raise RuntimeError(f"{self.path.name}: {name!r} started with {self._left} bytes of "
                               f"{self.layout[self.pos][0]!r} still unwritten")
        if self.pos >= len(self.layout):
            raise RuntimeError(f"{self.path.name}: {name!r} is beyond the planned tensors")
        want, want_code, want_shape = self.layout[self.pos]
        if name != want:
            raise RuntimeError(f"{self.path.name}: expected {want!r} next, got {name!r}")
        if (code, shape) != (want_code, want_shape):
            raise RuntimeError(f"{self.path.name}: {name!r} is {code} {list(shape)}, planned {want_code} {list(want_shape)}")

    def write(self, name: str, tensor: Any) -> None:
        code, shape, data = tensor_bytes(name, tensor)
        self.begin(name, code, shape)
        self.write_part(data)

    def begin(self, name: str, code: str, shape: tuple[int, ...]) -> None:
        """Start the next planned tensor; its bytes follow through `write_part`, in order."""
        shape = tuple(int(s) for s in shape)
        self._next(name, code, shape)
        self._left = math.prod(shape) * ITEMSIZE[code]
        if not self._left:
            self.pos += 1

    def write_part(self, data: Any) -> None:
        """The next bytes of the tensor begun by `begin` (a byte view: see `tensor_bytes`)."""
        view = memoryview(data).cast("B")
        if not len(view):
            return  # nothing to write (a zero-size tensor is complete at `begin`)
        if len(view) > self._left:
            raise RuntimeError(f"{self.path.name}: {len(view)} bytes given, {self._left} left in "
                               f"{self.layout[min(self.pos, len(self.layout) - 1)][0]!r}")
        self.out.write(view)
        self._left -= len(view)
        if not self._left:
            self.pos += 1

    def copy_raw(self, name: str, source: Header, source_name: str | None = None) -> None:
        """Write planned tensor `name` as the unchanged bytes of `source_name` in the file `source`
        describes (same dtype and shape), copied file to file by the kernel: no tensor in memory."""
        info = source.info(source_name or name)
        self._next(name, info.dtype, info.shape)
        fd = open_data(source)
        try:
            copy_range(fd, self.out.fd, info.begin, info.nbytes, where=f"{source.path}: tensor {info.name!r}")
        finally:
            os.close(fd)
        self.pos += 1

    def close(self) -> Path:
        if self.pos != len(self.layout) or self._left:
            raise RuntimeError(f"{self.path.name}: {len(self.layout) - self.pos} planned tensor(s) never written, "
                               f"first {self.layout[self.pos][0]!r}")
        return self.out.commit()

    def abort(self) -> None:
        self.out.discard()


def copy_range(fd_in: int, fd_out: int, offset: int, nbytes: int, where: str = "source") -> None:
    """Copy `nbytes` from `fd_in` at `offset` to the current position of `fd_out`
    (os.copy_file_range where the kernel allows it, else pread/write in 8 MiB pieces)."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(nbytes - done, 1 << 30)
        if use_cfr:
            try:
                got = os.copy_file_range(fd_in, fd_out, n, offset + done)
            except OSError:  # EXDEV, ENOSYS, EINVAL on some file systems: copy through user space
                use_cfr = False
                continue
        else:
            buf = os.pread(fd_in, min(n, 8 << 20), offset + done)
            got = os.write(fd_out, buf) if buf else 0
        if got <= 0:
            raise BadInputError(f"{where}: the file ended after {done} of {nbytes} bytes (it changed after its "
                                "header was read); re-create it")
        done += got
