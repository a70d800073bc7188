"""Streaming safetensors checkpoints: read tensor by tensor, write sharded output with an index.

Reading (`CheckpointReader`): a HF model folder with `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Every header is validated up front against its file's size
(lib.store.safetensors_io.read_header), so a truncated or corrupt checkpoint is refused before
any flow starts; each read then preads just that tensor's bytes.

Writing (`ShardedWriter`): the output layout (names, dtypes, shapes) is planned first, split
into shards of at most `max_shard_bytes`, and each shard (a lib.store.safetensors_io.StreamWriter)
gets its header first, then its tensors streamed in one at a time or copied raw by the kernel —
peak memory is one tensor, not one shard. The writer always emits
`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.

Publishing (`staged_output`): everything is written into a hidden temp folder beside the output
and renamed into place at the end (an existing non-empty output is swapped out only with
`overwrite=True`); on any error the temp folder is removed and the output is left untouched.
Side files (tokenizer, chat template, generation config, README, ...) are copied byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.core.dtypes import ITEMSIZE
from lib.core.errors import BadInputError
from lib.store.atomic import write_text_atomic
from lib.store.safetensors_io import Header, read_header, read_tensors, tensor_bytes
from lib.store.stream_writer import StreamWriter

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"

# Shards are flushed to disk every this many bytes as they are written (lib.store.atomic.AtomicFile):
# a 1-5 GB shard's closing fsync then waits for the last piece only, not for the whole shard.
SYNC_EVERY = 128 << 20


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


class CheckpointReader:
    """Tensor-by-tensor access to a HF safetensors checkpoint folder (no weights loaded up front).

    `entries` maps tensor name -> TensorEntry and `headers` file -> validated Header (headers
    only). `read(name)` returns a CPU torch tensor in the stored dtype.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise BadInputError(f"{self.folder}: not a model folder (no config.json); pass a folder written by "
                                "save_pretrained or a hub id")
        self.weight_files = self._weight_files()
        self.entries: dict[str, TensorEntry] = {}
        self.headers: dict[str, Header] = {}
        for f in self.weight_files:
            header = self.headers[f] = read_header(self.folder / f)
            for name, info in header.tensors.items():
                if name in self.entries:
                    raise BadInputError(f"{self.folder}: tensor {name!r} appears in both {self.entries[name].file} and {f}")
                self.entries[name] = TensorEntry(name, info.dtype, info.shape, f, info.begin)

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
        """The tensor `name` as a CPU torch tensor in its stored dtype."""
        entry = self.entries.get(name)
        if entry is None:
            raise BadInputError(f"{self.folder}: checkpoint has no tensor {name!r}")
        return read_tensors(self.headers[entry.file], [name], framework="pt")[name]

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
        self.stream: StreamWriter | None = None
        self.current = -1
        self.files = [shard_file_name(k, len(self.shards)) for k in range(len(self.shards))]

    def _open(self, k: int) -> None:
        self._close_file()
        self.current = k
        self.stream = StreamWriter(self.folder / self.files[k], [(e.name, e.dtype, e.shape) for e in self.shards[k]],
                                   self.metadata, sync_dir=False, sync_every=SYNC_EVERY)

    def _close_file(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def _shard_of(self, name: str) -> StreamWriter:
        if self.pos >= len(self.order):
            raise RuntimeError(f"ShardedWriter: {name!r} is beyond the planned tensors")
        k, _ = self.order[self.pos]
        if k != self.current:
            self._open(k)
        return self.stream

    def write(self, name: str, tensor: Any) -> None:
        self._shard_of(name).write(name, tensor)
        self.pos += 1

    def begin(self, name: str) -> None:
        """Start planned tensor `name`; its rows follow through `write_part` (in order, in the
        planned dtype), so a big tensor never has to exist whole in memory."""
        stream = self._shard_of(name)
        entry = self.order[self.pos][1]
        stream.begin(name, entry.dtype, entry.shape)
        self.pos += 1

    def write_part(self, tensor: Any) -> None:
        """The next rows of the tensor begun by `begin`."""
        _, entry = self.order[self.pos - 1]
        code, _, data = tensor_bytes(entry.name, tensor)
        if code != entry.dtype:
            raise RuntimeError(f"ShardedWriter: rows of {entry.name!r} are {code}, planned {entry.dtype}")
        self.stream.write_part(data)

    def copy_raw(self, name: str, source: CheckpointReader, source_name: str | None = None) -> None:
        """Write planned tensor `name` as the unchanged bytes of `source_name` in `source`
        (same dtype and shape), copied file to file by the kernel: no tensor in memory."""
        src = source.entries[source_name or name]
        self._shard_of(name).copy_raw(name, source.headers[src.file], src.name)
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
        if self.stream is not None:
            self.stream.abort()
            self.stream = None


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
