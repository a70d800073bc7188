"""Checksum validation of shard stores: re-hash every shard of one or more indexes.

    tourguide validate runs/x/activations/teacher/metadata.jsonl

`validate_indexes` hashes on all cores (hashlib drops the GIL); `require_valid` raises a
`ChecksumError` naming every bad shard and the command that recaptures exactly those.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lib.core.errors import ChecksumError
from lib.store.shards import ShardRecord, read_index, resolve_index_path, verify_record


@dataclass(frozen=True)
class ShardCheck:
    index: str
    shard: str
    sample_id: str
    bytes: int
    ok: bool
    reason: str  # "" when ok


def validate_indexes(index_paths: Iterable[str | os.PathLike], workers: int | None = None) -> list[ShardCheck]:
    """Re-hash every shard of every index in parallel (threads: hashlib releases the GIL).

    Returns one ShardCheck per row, in index order. Raises BadInputError for a missing or
    malformed index (those are not shard failures).
    """
    jobs: list[tuple[Path, Path, ShardRecord]] = []
    for ip in index_paths:
        path = resolve_index_path(ip)
        for rec in read_index(path):
            jobs.append((path, path.parent, rec))
    workers = workers or os.cpu_count() or 1

    def check(job: tuple[Path, Path, ShardRecord]) -> ShardCheck:
        path, folder, rec = job
        reason = verify_record(folder, rec)
        return ShardCheck(str(path), rec.shard, rec.sample_id, rec.bytes, reason is None, reason or "")

    if workers == 1 or len(jobs) <= 1:
        return [check(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, jobs))


def require_valid(index_paths: Iterable[str | os.PathLike]) -> list[ShardCheck]:
    """validate_indexes, raising ChecksumError that names every bad shard and how to recapture."""
    checks = validate_indexes(index_paths)
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = "\n".join(f"  {Path(c.index).parent / c.shard}: {c.reason}" for c in bad)
        raise ChecksumError(
            f"{len(bad)} of {len(checks)} shard(s) failed their checksum:\n{lines}\n"
            "Fix: re-run the same `tourguide capture` command into the same --output-dir; it recomputes exactly these shards."
        )
    return checks


def format_validation_table(checks: Sequence[ShardCheck]) -> str:
    rows = [f"{'status':6}  {'bytes':>10}  shard"]
    for c in checks:
        rows.append(f"{'ok' if c.ok else 'BAD':6}  {c.bytes:>10}  {Path(c.index).parent / c.shard}" + (f"  ({c.reason})" if not c.ok else ""))
    n_bad = sum(not c.ok for c in checks)
    rows.append(f"{len(checks)} shard(s), {n_bad} bad")
    return "\n".join(rows)


def verified_records(index_path: str | os.PathLike) -> tuple[Path, list[ShardRecord]]:
    """Read an index and require every shard to pass its checksum (for consumers)."""
    path = resolve_index_path(index_path)
    require_valid([path])
    return path.parent, read_index(path)
