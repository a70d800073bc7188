"""Streaming safetensors checkpoints: read tensor by tensor, write sharded output with an index.

Reading (`CheckpointReader`): a HF model folder with `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Each read opens the file with `safetensors.safe_open` and closes
it again, so the memory map (and the RSS it brings) never outlives one tensor.

Writing (`ShardedWriter`): the output layout (names, dtypes, shapes) is planned first, split
into shards of at most `max_shard_bytes`, and each shard's safetensors header is written before
its tensors are streamed in, one at a time — peak memory is one tensor, not one shard. The
writer always emits `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.

Publishing (`staged_output`): everything is written into a hidden temp folder beside the output
and renamed into place at the end (an existing non-empty output is swapped out only with
`overwrite=True`); on any error the temp folder is removed and the output is left untouched.
Side files (tokenizer, chat template, generation config, README, ...) are copied byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.core.dtypes import ITEMSIZE, ST_DTYPES, st_code
from lib.core.errors import BadInputError
from lib.store.atomic import write_text_atomic

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB: small enough for any loader, few enough files


# Files that are weights (never copied as side files) or fold outputs of a previous run.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", "config.json", "fold_report.json", "FOLD_FAILED"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: name, safetensors dtype code, shape, the file holding it and
    the absolute byte offset of its data in that file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str = ""
    offset: int = -1

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON) and the
    offset where the data section starts."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise BadInputError(f"{path}: truncated safetensors file (no header); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise BadInputError(f"{path}: safetensors header of {n} bytes is implausible; the file is corrupt")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadInputError(f"{path}: safetensors header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object; the file is corrupt")
    return header, 8 + n


class CheckpointReader:
    """Tensor-by-tensor access to a HF safetensors checkpoint folder (no weights loaded up front).

    `entries` maps tensor name -> TensorEntry (headers only). `read(name)` returns a CPU torch
    tensor in the stored dtype, opening its file with `safe_open` for that one read.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise BadInputError(f"{self.folder}: not a model folder (no config.json); pass a folder written by "
                                "save_pretrained or a hub id")
        self.weight_files = self._weight_files()
        self.entries: dict[str, TensorEntry] = {}
        for f in self.weight_files:
            header, data_start = _read_header(self.folder / f)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
                if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *offsets])):
                    raise BadInputError(f"{self.folder / f}: tensor {name!r} has a malformed header entry {info!r:.100}; "
                                        "the file is corrupt")
                if info.get("dtype") not in ST_DTYPES:
                    raise BadInputError(f"{self.folder / f}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
                if name in self.entries:
                    raise BadInputError(f"{self.folder}: tensor {name!r} appears in both {self.entries[name].file} and {f}")
                entry = TensorEntry(name, info["dtype"], tuple(shape), f, data_start + offsets[0])
                if offsets[1] - offsets[0] != entry.nbytes:
                    raise BadInputError(f"{self.folder / f}: tensor {name!r} spans {info['data_offsets']} bytes, its "
                                        f"shape {entry.shape} and dtype {entry.dtype} need {entry.nbytes}; the file is corrupt")
                self.entries[name] = entry

    def _weight_files(self) -> list[str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInputError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise BadInputError(f"{index}: lists shard(s) {missing[:3]} that are missing from {self.folder}; "
                                    "the download is incomplete")
            return files
        if (self.folder / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if files:
            return files
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")) or any(self.folder.glob("*.pth")):
            raise BadInputError(f"{self.folder}: only pickle weights (*.bin/*.pt) found; this project never unpickles. "
                                "Convert them to safetensors first (load + save_pretrained(safe_serialization=True)).")
        raise BadInputError(f"{self.folder}: no *.safetensors weights found")

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{self.folder / 'config.json'}: not valid JSON ({exc})") from None

    def read(self, name: str):
        """The tensor `name` as a CPU torch tensor in its stored dtype (one safe_open per call)."""
        from safetensors import safe_open

        entry = self.entries.get(name)
        if entry is None:
            raise BadInputError(f"{self.folder}: checkpoint has no tensor {name!r}")
        with safe_open(str(self.folder / entry.file), framework="pt") as fh:
            return fh.get_tensor(name)

    def path_of(self, name: str) -> Path:
        return self.folder / self.entries[name].file

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Split `entries` (in order) into shards of at most `max_shard_bytes` (a bigger tensor gets
    a shard of its own)."""
    if max_shard_bytes <= 0:
        raise BadInputError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def shard_file_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _header_bytes(entries: Sequence[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Write planned tensors into sharded safetensors files, one tensor at a time.

    Call `write(name, tensor)` for every planned entry in plan order; `close()` checks that all
    were written, fsyncs and writes the index. The tensor's dtype and shape must match the plan.
    """

    def __init__(self, folder: str | os.PathLike, entries: Sequence[TensorEntry],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.order = [(k, e) for k, shard in enumerate(self.shards) for e in shard]
        self.pos = 0
        self.fh: Any = None
        self.current = -1
        self.files = [shard_file_name(k, len(self.shards)) for k in range(len(self.shards))]

    def _open(self, k: int) -> None:
        self._close_file()
        self.current = k
        self.fh = open(self.folder / self.files[k], "wb")
        self.fh.write(_header_bytes(self.shards[k], self.metadata))

    def _close_file(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None

    def write(self, name: str, tensor: Any) -> None:
        if self.pos >= len(self.order):
            raise RuntimeError(f"ShardedWriter: {name!r} is beyond the planned tensors")
        k, e = self.order[self.pos]
        if name != e.name:
            raise RuntimeError(f"ShardedWriter: expected {e.name!r} next, got {name!r}")
        if st_code(tensor.dtype) != e.dtype or tuple(tensor.shape) != e.shape:
            raise RuntimeError(f"ShardedWriter: {name!r} is {st_code(tensor.dtype)} {list(tensor.shape)}, "
                               f"planned {e.dtype} {list(e.shape)}")
        if k != self.current:
            self._open(k)
        t = tensor.detach().contiguous().cpu()
        # Bytes view without a copy (bf16 has no numpy dtype: view as uint8 first).
        import torch

        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.fh.write(memoryview(data) if t.numel() else data)
        self.pos += 1

    def copy_raw(self, name: str, source: CheckpointReader, source_name: str | None = None) -> None:
        """Write planned tensor `name` as the unchanged bytes of `source_name` in `source`
        (same dtype and shape), copied file to file by the kernel: no tensor in memory."""
        if self.pos >= len(self.order):
            raise RuntimeError(f"ShardedWriter: {name!r} is beyond the planned tensors")
        k, e = self.order[self.pos]
        src = source.entries[source_name or name]
        if name != e.name or (src.dtype, src.shape) != (e.dtype, e.shape):
            raise RuntimeError(f"ShardedWriter: cannot copy {src.name!r} {src.dtype} {list(src.shape)} as planned "
                               f"{e.name!r} {e.dtype} {list(e.shape)}")
        if k != self.current:
            self._open(k)
        self.fh.flush()
        with open(source.path_of(src.name), "rb") as fin:
            copy_range(fin.fileno(), self.fh.fileno(), src.offset, e.nbytes)
        self.pos += 1

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write model.safetensors.index.json. Returns the index."""
        if self.pos != len(self.order):
            raise RuntimeError(f"ShardedWriter: {len(self.order) - self.pos} planned tensor(s) never written, "
                               f"first {self.order[self.pos][1].name!r}")
        self._close_file()
        index = {"metadata": {"total_size": sum(e.nbytes for _, e in self.order)},
                 "weight_map": {e.name: self.files[k] for k, e in self.order}}
        write_text_atomic(self.folder / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return index

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def copy_range(fd_in: int, fd_out: int, offset: int, nbytes: int) -> None:
    """Copy `nbytes` from `fd_in` at `offset` to the current position of `fd_out`
    (os.copy_file_range where the kernel has it, else pread/write in 8 MiB pieces)."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(nbytes - done, 1 << 30)
        if use_cfr:
            try:
                got = os.copy_file_range(fd_in, fd_out, n, offset + done)
            except OSError:
                use_cfr = False
                continue
        else:
            buf = os.pread(fd_in, min(n, 8 << 20), offset + done)
            got = os.write(fd_out, buf)
        if got <= 0:
            raise OSError(f"short copy: {done} of {nbytes} bytes (source truncated?)")
        done += got


def copy_side_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy every non-weight regular file of `source` (tokenizer, chat template, generation
    config, README, ...) byte for byte into `dest`; config.json and weights are skipped (the fold
    writes those). Symlinks (HF cache snapshots) are followed. Returns the names copied."""
    copied = []
    for p in sorted(Path(source).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in NOT_COPIED or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(p, Path(dest) / p.name)
        with open(Path(dest) / p.name, "rb+") as fh:
            os.fsync(fh.fileno())
        copied.append(p.name)
    return copied


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB', or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise BadInputError(f"size {text!r} is not understood; write e.g. 2GB, 500MB or 1.5GiB") from None
