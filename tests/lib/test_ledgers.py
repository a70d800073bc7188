"""Ledgers: declared schemas, both backends, and appends that a retry cannot double."""

from __future__ import annotations

import json

import pytest

from lib.core.errors import BadInputError
from lib.store.ledgers import APPEND_FIELD, append_rows, read_ledger


def rows(writer: str, at: str, n: int = 3) -> list[dict]:
    return [{"run_id": writer, "index": "i", "shard": f"{writer}-{j}", "sample_id": f"s{j}", "sha256": "0" * 64,
             "bytes": j, "ok": True, "checked_at": at} for j in range(n)]


@pytest.mark.parametrize("name", ["ledgers/shards", "shards.jsonl"])
def test_a_repeated_append_is_written_once(tmp_path, name):
    """A retried task appends the same facts again, a few seconds later: one copy stays."""
    path = tmp_path / name
    first = append_rows(path, "shards", rows("w", "2026-11-30T02:00:00"))
    again = append_rows(path, "shards", rows("w", "2026-11-30T02:00:07"))
    assert again == first
    table = read_ledger(path, "shards")
    assert len(table) == 3 and list(table.checked_at.unique()) == ["2026-11-30T02:00:00"]
    # negative control: different facts are appended
    append_rows(path, "shards", rows("other", "2026-11-30T02:00:09"))
    assert len(read_ledger(path, "shards")) == 6
    # an explicit key makes two identical row sets two appends
    append_rows(path, "shards", rows("w", "later"), key="second-night")
    assert len(read_ledger(path, "shards")) == 9
    if path.suffix == ".jsonl":
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert all(APPEND_FIELD in x for x in lines) and APPEND_FIELD not in read_ledger(path, "shards").columns


def test_a_torn_jsonl_line_is_named(tmp_path):
    path = tmp_path / "shards.jsonl"
    append_rows(path, "shards", rows("w", "t"))
    with open(path, "a") as fh:
        fh.write('{"run_id": "w", "sha')
    with pytest.raises(BadInputError, match=r"shards.jsonl:4: malformed JSON"):
        append_rows(path, "shards", rows("v", "t"))
    with pytest.raises(BadInputError, match=r"shards.jsonl:4: malformed JSON"):
        read_ledger(path, "shards")
