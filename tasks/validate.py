"""The validation tasks every consumer calls before reading shards."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from lib.store.validation import require_valid, validate_indexes
from tasks.names import artifact_key, path_key, place_in_run


# Never cached: a checksum is a fact about the bytes on disk now, and a cached "ok" from earlier in
# the same flow run (Prefect's default policy caches on the inputs) would hide a shard damaged since.
@task(name="validate-shards", task_run_name="validate-{label}", cache_policy=NO_CACHE)
def validate_shards(index_paths: list[str], label: str = "shards") -> dict:
    """Re-hash every shard of `index_paths`; raise ChecksumError naming each bad shard (with the
    command that recaptures exactly those). Returns {"n_shards", "bytes", "indexes"}; not retried:
    a mismatch is a real failure."""
    checks = require_valid(index_paths)
    if TaskRunContext.get() is not None:  # also callable as validate_shards.fn(...) outside a run
        create_table_artifact(
            key=checksums_key(index_paths, label),
            table=[{"index": c.index, "shard": c.shard, "bytes": c.bytes, "ok": c.ok} for c in checks[:200]],
            description=f"checksums of {len(checks)} shard(s) in {len(index_paths)} index(es)",
        )
    return {"n_shards": len(checks), "bytes": sum(c.bytes for c in checks), "indexes": list(index_paths)}


def checksums_key(index_paths: list[str], label: str) -> str:
    """`checksums-<run>-<capture>` for one index; `checksums-<run>-<label>` for several."""
    if len(index_paths) == 1:
        return path_key("checksums", index_paths[0], label)
    return artifact_key("checksums", place_in_run(index_paths[0] if index_paths else None)[0], label)


@task(name="hash-shards", task_run_name="hash-shards", cache_policy=NO_CACHE)
def hash_shards(index_paths: list[str]) -> list[dict]:
    """Every shard's check as a dict (index, shard, sample_id, bytes, ok, reason); never raises
    for a bad shard (the CLI reports them and exits 1)."""
    return [asdict(c) for c in validate_indexes(index_paths)]
