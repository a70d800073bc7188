"""A one-task flow around shard hashing, so `tourguide validate` shows in the UI when a server is
configured (PREFECT_API_URL). Run: `tourguide validate runs/x/activations/*/metadata.jsonl`."""

from __future__ import annotations

from prefect import flow

from tasks.validate import hash_shards


@flow(name="validate", flow_run_name="validate-shards")
def validate_flow(index_paths: list[str]) -> list[dict]:
    return hash_shards(index_paths)
