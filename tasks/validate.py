"""The validation task every consumer calls before reading shards."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from lib.shards import require_valid


@task(name="validate-shards", task_run_name="validate-{label}")
def validate_shards(index_paths: list[str], label: str = "shards") -> dict:
    """Re-hash every shard of `index_paths`; raise ChecksumError naming each bad shard.

    Returns {"n_shards", "bytes", "indexes"}; not retried (a mismatch is a real failure).
    """
    checks = require_valid(index_paths)
    create_table_artifact(
        key=None,
        table=[{"index": c.index, "shard": c.shard, "bytes": c.bytes, "ok": c.ok} for c in checks[:200]],
        description=f"checksums of {len(checks)} shard(s) in {len(index_paths)} index(es)",
    )
    return {"n_shards": len(checks), "bytes": sum(c.bytes for c in checks), "indexes": list(index_paths)}
