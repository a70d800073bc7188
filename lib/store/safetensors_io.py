"""The one safetensors I/O path: validated headers, deterministic bytes, streaming writes.

The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
data section (raw little-endian, row-major). Every safetensors file the project writes or reads
(shards, checkpoints, rotations, permutations, stats, spec tensors, QA transports, the vLLM
worker's result files) goes through here:

- `read_header` checks the whole layout against the file size before any data is read: a known
  dtype, shape × item size = span, tensors back to back from byte 0 to the end of the file. A
  truncated or corrupt file is a BadInputError naming the file, the tensor, the reason and the
  fix — never a raw library error, a crash, or a short tensor later.
- `read_tensors` (by name), `read_rows` (rows [a, b) of 2-D+ tensors, reading only those bytes)
  and `load_tensors` (+ metadata) give numpy arrays or torch tensors, read with pread.
- Writing lays the bytes out here: metadata keys sorted, tensors in name order unless an order
  is given, the header space-padded to a multiple of 8 (data 8-byte aligned). Equal inputs give
  equal bytes (the safetensors library orders metadata by hash), so a file's sha256 identifies
  its content. `tensor_parts` returns zero-copy buffers (hashing, writev) and `save_tensors`
  writes atomically; lib.store.stream_writer writes a planned layout piece by piece.

torch is imported lazily: lib.capture.vllm_worker uses this module inside vLLM's own venv.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.dtypes import ITEMSIZE, TORCH_TO_ST, numpy_dtype_of, torch_dtype_of
from lib.core.errors import BadInputError, TransientError
from lib.store.atomic import write_bytes_atomic

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


METADATA_KEY = "__metadata__"


CORRUPT = "the file is corrupt or was cut short: re-download or re-create it"


Layout = Sequence[tuple[str, str, Sequence[int]]]  # (name, dtype code, shape) in file order


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: dtype code, shape and absolute byte offsets [begin, end) in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in header order, metadata, where the data starts, file size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInputError(f"{self.path}: no tensor {name!r} (it holds {sorted(self.tensors)[:12]}); "
                                "pass a file written for this purpose") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _bad(path: Path, reason: str, name: str | None = None, fix: str = CORRUPT) -> BadInputError:
    tensor = "" if name is None else f"tensor {name!r} "
    return BadInputError(f"{path}: not a readable safetensors file: {tensor}{reason}; {fix}")


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file (see the module doc). Raises
    BadInputError naming the file (and the tensor) for anything malformed or out of bounds."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(8)
            if len(raw) < 8:
                raise _bad(path, f"{size} bytes is too short to hold a header")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"a header of {n} bytes is implausible (limit {MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise _bad(path, f"the header needs {n} bytes but only {size - 8} follow its length")
            head = fh.read(n)
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.strerror})") from None
    except OSError as exc:
        raise TransientError(f"{path}: I/O error reading the header ({exc})") from exc
    try:
        header = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"the header is not valid UTF-8 JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, f"{METADATA_KEY} must map strings to strings, got {metadata!r:.100}")
    tensors = {name: _entry(path, name, info, 8 + n) for name, info in header.items()}
    _check_layout(path, tensors, 8 + n, size)
    return Header(path, tensors, metadata, 8 + n, size)


def _entry(path: Path, name: str, info: Any, data_start: int) -> TensorInfo:
    if not isinstance(info, dict):
        raise _bad(path, f"has a header entry that is a JSON {type(info).__name__}, not an object", name)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and dtype in ITEMSIZE):
        raise _bad(path, f"has dtype {dtype!r:.40}, not one of {sorted(ITEMSIZE)}", name,
                   "convert the tensor to one of those, or the file is corrupt")
    if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
        raise _bad(path, f"has shape {shape!r:.60}, not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)
            and offsets[0] <= offsets[1]):
        raise _bad(path, f"has data_offsets {offsets!r:.60}, not [begin, end] with 0 <= begin <= end", name)
    need = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != need:
        raise _bad(path, f"spans data_offsets {offsets} ({offsets[1] - offsets[0]} bytes) but shape {shape} "
                         f"of {dtype} needs {need}", name)
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensors must tile the data section exactly: back to back from its start to the file's end."""
    expected, prev = data_start, None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != expected:
            what = f"overlaps tensor {prev!r}" if t.begin < expected else f"leaves a gap of {t.begin - expected} bytes"
            raise _bad(path, f"starts at data byte {t.begin - data_start}, which {what} "
                             f"(expected {expected - data_start})", t.name)
        if t.end > size:
            raise _bad(path, f"needs bytes {t.begin}..{t.end} but the file ends at byte {size}: it is truncated",
                       t.name, "re-download or re-create the file")
        expected, prev = t.end, t.name
    if expected != size:
        raise _bad(path, f"{size - expected} bytes follow the last tensor (the header describes {expected} "
                         f"bytes, the file has {size})")


# --- reading ---------------------------------------------------------------------------------------
def _empty(header: Header, info: TensorInfo, shape: tuple[int, ...], framework: str) -> tuple[Any, memoryview]:
    """An uninitialised array/tensor of `shape` in the tensor's dtype and a byte view of it."""
    if framework == "pt":
        import torch

        t = torch.empty(shape, dtype=torch_dtype_of(info.dtype))
        return t, memoryview(t.reshape(-1).view(torch.uint8).numpy())
    if framework != "np":
        raise ValueError(f"framework must be 'np' or 'pt', got {framework!r}")
    dt = numpy_dtype_of(info.dtype)
    if dt is None:
        raise BadInputError(f"{header.path}: tensor {info.name!r} is {info.dtype}, which numpy cannot hold; "
                            "store it as F32/F64")
    a = np.empty(shape, dt)
    return a, memoryview(a.reshape(-1).view(np.uint8))


def _pread_into(fd: int, view: memoryview, offset: int, header: Header, name: str) -> None:
    done = 0
    try:
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise BadInputError(f"{header.path}: tensor {name!r}: the file ended after {done} of {len(view)} bytes "
                                    "(it changed after its header was read); re-create it")
            done += got
    except OSError as exc:
        raise TransientError(f"{header.path}: tensor {name!r}: I/O error while reading ({exc})") from exc


def open_data(header: Header) -> int:
    try:
        return os.open(header.path, os.O_RDONLY)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise BadInputError(f"{header.path}: cannot be read ({exc.strerror})") from None


def read_tensors(source: str | os.PathLike | Header, names: Iterable[str] | None = None, *,
                 framework: str = "np") -> dict[str, Any]:
    """Tensors `names` (default: all, in header order) of a file or a validated `Header`, as
    numpy arrays (framework='np') or CPU torch tensors ('pt') in the stored dtype."""
    header = source if isinstance(source, Header) else read_header(source)
    infos = [header.info(n) for n in (header.tensors if names is None else names)]
    out: dict[str, Any] = {}
    fd = open_data(header)
    try:
        for info in infos:
            arr, view = _empty(header, info, info.shape, framework)
            _pread_into(fd, view, info.begin, header, info.name)
            out[info.name] = arr
    finally:
        os.close(fd)
    return out


def read_rows(source: str | os.PathLike | Header, names: Sequence[str], start: int, stop: int, *,
              framework: str = "np") -> list[Any]:
    """Rows [start, stop) (clamped like a Python slice) of each named tensor (at least 1-D),
    reading only those bytes."""
    header = source if isinstance(source, Header) else read_header(source)
    out = []
    fd = open_data(header)
    try:
        for name in names:
            info = header.info(name)
            if not info.shape:
                raise BadInputError(f"{header.path}: tensor {name!r} is a scalar; it has no rows to read")
            a, b, _ = slice(start, stop).indices(info.shape[0])
            b = max(a, b)
            row_bytes = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]
            arr, view = _empty(header, info, (b - a, *info.shape[1:]), framework)
            _pread_into(fd, view, info.begin + a * row_bytes, header, name)
            out.append(arr)
    finally:
        os.close(fd)
    return out


def load_tensors(path: str | os.PathLike, *, framework: str = "np") -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a file (numpy or torch) and its header metadata."""
    header = read_header(path)
    return read_tensors(header, framework=framework), dict(header.metadata)


# --- writing ---------------------------------------------------------------------------------------
def tensor_bytes(name: str, tensor: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype code, shape, zero-copy little-endian byte view) of a numpy array or torch tensor
    (a copy only where it is not contiguous, not on the CPU, or big-endian)."""
    if hasattr(tensor, "detach"):  # torch, imported only when a tensor is handed in
        import torch

        t = tensor.detach().contiguous().cpu()
        code, shape = TORCH_TO_ST.get(str(t.dtype).removeprefix("torch.")), tuple(t.shape)
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        kind = t.dtype
    else:
        a = np.asarray(tensor)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = a if a.flags.c_contiguous else a.copy(order="C")
        code, shape, kind = TORCH_TO_ST.get(a.dtype.name), a.shape, a.dtype
        data = memoryview(a.reshape(-1).view(np.uint8))
    if code is None:
        raise BadInputError(f"tensor {name!r}: dtype {kind} cannot be stored in safetensors "
                            f"(supported: {sorted(TORCH_TO_ST)})")
    return code, tuple(int(s) for s in shape), data


def header_bytes(layout: Layout, metadata: Mapping[str, str] | None = None) -> bytes:
    """Length prefix + JSON header for `layout` (tensors back to back in that order), metadata keys
    sorted, compact JSON, space-padded to a multiple of 8 bytes."""
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadInputError(f"safetensors metadata must map str -> str, got {meta!r:.100}")
    header: dict[str, Any] = {METADATA_KEY: dict(sorted(meta.items()))} if meta else {}
    offset = 0
    for name, code, shape in layout:
        if name == METADATA_KEY or name in header:
            raise BadInputError(f"tensor name {name!r} is reserved or used twice")
        n = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    try:
        head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInputError(f"safetensors header holds text that is not valid Unicode ({exc.reason})") from None
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def tensor_parts(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
                 order: Sequence[str] | None = None) -> list[Any]:
    """The bytes of a safetensors file as buffers: the header, then each tensor's data as a
    zero-copy view (name order unless `order` is given), for hashing or writing without joining."""
    names = sorted(tensors) if order is None else list(order)
    if sorted(names) != sorted(tensors):
        raise ValueError(f"order {names} must name each tensor once: {sorted(tensors)}")
    raws = [tensor_bytes(n, tensors[n]) for n in names]
    head = header_bytes([(n, code, shape) for n, (code, shape, _) in zip(names, raws, strict=True)], metadata)
    return [head, *(data for _, _, data in raws)]


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
                 order: Sequence[str] | None = None, durable: bool = True) -> Path:
    """Write tensors (numpy or torch) to `path` atomically (temp + fsync + rename; `durable=False`
    skips the fsyncs, for scratch files read at once); see `tensor_parts`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, tensor_parts(tensors, metadata, order=order), fsync=durable)
