"""The shard store: one safetensors file per captured sample plus a `metadata.jsonl` index.

Layout of a capture folder::

    <output-dir>/sample_0000.safetensors   tensors: input_ids [T] int64, logits [T, V] (optional),
                                           act/<hook point> [T, d] per hook point
    <output-dir>/metadata.jsonl            one JSON object per complete shard (`ShardRecord`)
    <output-dir>/.index.lock               advisory lock held while writing shards + index lines

Writes go temp file -> fsync -> rename -> append index line (under the lock), so the index
never names a shard that is not complete on disk and never holds two rows for one capture key.
Run it: `tourguide validate runs/x/activations/teacher/metadata.jsonl`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from lib.core.digests import sha256_file
from lib.core.errors import BadInputError
from lib.core.options import Frozen
from lib.store.atomic import append_lines_durable, fsync_dir, locked, write_bytes_atomic, write_text_atomic
from lib.store.safetensors_io import read_header, read_tensors, tensor_parts

INDEX_NAME = "metadata.jsonl"


LOCK_NAME = ".index.lock"


ACT_PREFIX = "act/"


INPUT_SUFFIX = ":input"  # hook point naming: "<module>" = module output, "<module>:input" = its input


LAYER_CONVENTION = "act/<module>=output of the module (decoder block: residual after it); act/<module>:input=first positional input"


def shard_name(sample_index: int) -> str:
    return f"sample_{sample_index:04d}.safetensors"


def _plain_file_name(shard: str) -> str:
    try:
        encoded = os.fsencode(shard)
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        encoded = b"\x00"
    if ("/" in shard or "\\" in shard or shard in ("", ".", "..") or shard.startswith(".")
            or b"\x00" in encoded or len(encoded) > 255):  # NUL, unencodable, over-long: os.stat would raise
        raise ValueError(f"shard name {shard!r} must be a plain file name inside the index folder")
    return shard


class ShardRecord(Frozen):
    """One row of `metadata.jsonl`: everything a consumer needs without opening the shard.

    `ShardRecord.parse(row, where)` type-checks a row read back (strict: JSON types only) and
    names 'file:line' and the key in every error. Keys this build does not know are ignored
    rather than refused: the index is an on-disk format that newer writers may extend."""

    model_config = ConfigDict(extra="ignore", strict=True)
    root: ClassVar[str] = "index row"
    hint: ClassVar[str] = "fix or delete that line, or recapture into a fresh --output-dir"

    shard: Annotated[str, AfterValidator(_plain_file_name)]  # file name relative to the index's folder
    sample_id: str
    sample_index: int
    text_sha256: str
    token_start: int  # span of this sample in the capture's global token stream
    token_end: int
    n_tokens: int
    truncated: bool
    layers: list[str]  # hook points stored as act/<name>
    dtype: str
    shapes: dict[str, list[Annotated[int, Field(ge=0)]]]  # tensor name -> shape
    sha256: str
    bytes: int
    model: str
    revision: str
    tokenizer: str
    backend: str
    capture_key: str
    capture_version: str
    logits: bool
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _span(self) -> ShardRecord:
        if self.n_tokens != self.token_end - self.token_start or self.n_tokens < 0:
            raise ValueError(f"token span [{self.token_start}, {self.token_end}) disagrees with n_tokens={self.n_tokens}")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True, ensure_ascii=False)


def read_index(index_path: str | os.PathLike) -> list[ShardRecord]:
    """Read `metadata.jsonl` (a folder is taken to mean its metadata.jsonl).

    Raises BadInputError naming the file and line for a missing file or a malformed row.
    A trailing line without newline (a writer killed mid-append) is malformed too.
    """
    path = resolve_index_path(index_path)
    records: list[ShardRecord] = []
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a folder without {INDEX_NAME}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); the index is corrupt, recapture") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BadInputError(f"{path}:{lineno}: malformed JSON ({exc.__class__.__name__}: {str(exc)[:80]}); fix or delete that line and re-run capture") from None
        records.append(ShardRecord.parse(row, f"{path}:{lineno}"))
    return records


def resolve_index_path(index_path: str | os.PathLike) -> Path:
    path = Path(index_path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.exists():
        raise BadInputError(f"{path}: index file not found; pass the metadata.jsonl written by `tourguide capture` (or its folder)")
    return path


def shard_parts(tensors: dict[str, Any], metadata: dict[str, str]) -> list[Any]:
    """The bytes of a shard as a list of buffers (header, then each tensor's data, zero-copy
    views where the tensor is contiguous on CPU), for hashing and `writev` without joining:
    tensors in name order, metadata keys sorted (lib.store.safetensors_io.tensor_parts), so that
    equal inputs give equal bytes and equal checksums."""
    return tensor_parts(tensors, metadata)


def serialize_shard(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """safetensors bytes for `tensors` (torch) with string `metadata` in the header (see shard_parts)."""
    return b"".join(shard_parts(tensors, metadata))


def commit_shards(out_dir: Path, items: Sequence[tuple[ShardRecord, bytes]]) -> list[ShardRecord]:
    """Atomically write shards and append their index rows, skipping capture keys already
    indexed by a valid shard (another writer got there first). Returns the rows written.

    A row whose shard went missing/corrupt, or another row for the same shard file name, is
    replaced: the index is rewritten atomically without it, so it never holds two rows for one
    capture key or a row for a shard that is not on disk. Each `ShardRecord` must already
    carry the sha256/bytes of its payload.
    """
    index_path = out_dir / INDEX_NAME
    written: list[ShardRecord] = []
    with locked(out_dir / LOCK_NAME):
        rows = read_index(index_path) if index_path.exists() else []
        existing = {r.capture_key: r for r in rows}
        by_shard = {r.shard: r for r in rows}
        stale = False
        pending: list[ShardRecord] = []

        def flush() -> None:
            # Shards are complete and their renames durable before their rows exist: a crash
            # before the append leaves unindexed shards that the next run simply rewrites.
            if pending:
                fsync_dir(out_dir)
                append_lines_durable(index_path, [r.to_json() for r in pending])
                pending.clear()

        for record, payload in items:
            prior = existing.get(record.capture_key)
            if prior is not None and verify_record(out_dir, prior) is None:
                continue
            other = by_shard.get(record.shard)
            stale = stale or prior is not None or (other is not None and other.capture_key != record.capture_key)
            if stale:
                # Drop the row that names this file before overwriting it: a crash in between
                # then leaves an unindexed file, never an index row with the wrong checksum.
                flush()
                rows = [r for r in rows if r.shard != record.shard and r.capture_key != record.capture_key]
                write_text_atomic(index_path, "".join(r.to_json() + "\n" for r in rows))
                stale = False
            # fsync the file now, the folder once per batch (flush), before any row names it.
            write_bytes_atomic(out_dir / record.shard, payload, sync_dir=False)
            pending.append(record)
            rows.append(record)
            existing[record.capture_key] = record
            by_shard[record.shard] = record
            written.append(record)
        flush()
    return written


def make_payload_record(record_fields: dict[str, Any], payload: Any) -> ShardRecord:
    """The index row for `payload` (bytes, or the buffer list of `shard_parts`)."""
    import hashlib

    parts = [payload] if isinstance(payload, bytes | bytearray | memoryview) else list(payload)
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return ShardRecord(**record_fields, sha256=h.hexdigest(), bytes=sum(memoryview(p).nbytes for p in parts))


def verify_record(folder: Path, record: ShardRecord) -> str | None:
    """None when the shard exists with the recorded size and sha256, else the reason."""
    path = folder / record.shard
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    size = st.st_size
    if size != record.bytes:
        return f"size {size} != recorded {record.bytes} (truncated or overwritten)"
    digest = sha256_file(path)
    if digest != record.sha256:
        return f"sha256 {digest[:12]}… != recorded {record.sha256[:12]}…"
    return None


def load_shard(path: str | os.PathLike, names: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Load tensors (all, or `names`) and the header metadata of one shard (torch tensors)."""
    header = read_header(path)
    return read_tensors(header, names, framework="pt"), dict(header.metadata)
