"""Shard bytes, index rows, commit semantics and validation (no model needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.digests import sha256_file
from lib.core.errors import BadInputError, ChecksumError
from lib.store.shards import (
    INDEX_NAME,
    ShardRecord,
    commit_shards,
    make_payload_record,
    read_index,
    serialize_shard,
    shard_name,
)
from lib.store.validation import require_valid, validate_indexes


def fields(i: int, start: int = 0, n: int = 3, key: str | None = None) -> dict:
    return dict(shard=shard_name(i), sample_id=f"s{i}", sample_index=i, text_sha256="ab" * 32, token_start=start,
                token_end=start + n, n_tokens=n, truncated=False, layers=["model.layers.0"], dtype="float32",
                shapes={"input_ids": [n], "act/model.layers.0": [n, 4]}, model="m", revision="r", tokenizer="m",
                backend="torch", capture_key=key or f"key{i}", capture_version="1", logits=False)


def payload(i: int, n: int = 3) -> bytes:
    t = {"input_ids": torch.arange(n, dtype=torch.int64) + i,
         "act/model.layers.0": torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) / (i + 1)}
    return serialize_shard(t, {"sample_id": f"s{i}", "text": "héllo 你好"})


def make_store(folder: Path, n: int = 5) -> list[ShardRecord]:
    folder.mkdir(parents=True, exist_ok=True)
    items = [(make_payload_record(fields(i, 3 * i), payload(i)), payload(i)) for i in range(n)]
    return commit_shards(folder, items)


def test_shard_bytes_follow_the_safetensors_layout():
    """Golden-bytes check with our own reader: u64 header length, JSON header, raw LE data."""
    data = payload(2)
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    assert header["__metadata__"] == {"sample_id": "s2", "text": "héllo 你好"}
    body = data[8 + hlen :]
    ids = header["input_ids"]
    assert ids["dtype"] == "I64" and ids["shape"] == [3]
    lo, hi = ids["data_offsets"]
    assert np.frombuffer(body[lo:hi], dtype="<i8").tolist() == [2, 3, 4]
    act = header["act/model.layers.0"]
    lo, hi = act["data_offsets"]
    assert act["dtype"] == "F32" and act["shape"] == [3, 4]
    np.testing.assert_array_equal(np.frombuffer(body[lo:hi], dtype="<f4").reshape(3, 4), (np.arange(12, dtype=np.float32) / np.float32(3)).reshape(3, 4))
    assert payload(2) == data, "serialisation must be deterministic (checksums depend on it)"


def test_commit_is_idempotent_and_rows_match_files(tmp_path):
    written = make_store(tmp_path)
    assert len(written) == 5
    again = make_store(tmp_path)
    assert again == [], "a second commit of the same capture keys wrote rows again"
    rows = read_index(tmp_path)
    assert len(rows) == 5 and len({r.capture_key for r in rows}) == 5
    for r in rows:
        assert sha256_file(tmp_path / r.shard) == r.sha256 and (tmp_path / r.shard).stat().st_size == r.bytes
    assert not list(tmp_path.glob(".tmp-*")), "temp files left behind"


def test_unindexed_shard_from_a_crash_is_rewritten_once(tmp_path):
    make_store(tmp_path, 2)
    # crash between rename and index append: a complete shard on disk, no row
    (tmp_path / shard_name(2)).write_bytes(payload(2))
    # and a stale row whose shard vanished
    (tmp_path / shard_name(1)).unlink()
    items = [(make_payload_record(fields(i, 3 * i), payload(i)), payload(i)) for i in range(3)]
    written = commit_shards(tmp_path, items)
    assert sorted(r.sample_index for r in written) == [1, 2]
    rows = read_index(tmp_path)
    assert sorted(r.capture_key for r in rows) == ["key0", "key1", "key2"], "duplicate or dangling rows"
    assert all(c.ok for c in validate_indexes([tmp_path]))


def test_validate_names_exactly_the_bad_shards(tmp_path):
    make_store(tmp_path, 6)
    flip = tmp_path / shard_name(1)
    raw = bytearray(flip.read_bytes())
    raw[-3] ^= 0x01
    flip.write_bytes(bytes(raw))
    trunc = tmp_path / shard_name(4)
    trunc.write_bytes(trunc.read_bytes()[:-5])
    (tmp_path / shard_name(5)).unlink()
    checks = validate_indexes([tmp_path / INDEX_NAME], workers=2)
    bad = {c.shard: c.reason for c in checks if not c.ok}
    assert set(bad) == {shard_name(1), shard_name(4), shard_name(5)}
    assert "sha256" in bad[shard_name(1)] and "truncated" in bad[shard_name(4)] and bad[shard_name(5)] == "missing"
    with pytest.raises(ChecksumError) as err:
        require_valid([tmp_path])
    msg = str(err.value)
    assert all(shard_name(i) in msg for i in (1, 4, 5)) and shard_name(0) not in msg
    assert "tourguide capture" in msg


@pytest.mark.parametrize("line, match", [
    ("{not json", r":2: malformed JSON"),
    ("[1, 2]", r":2: index row: must be a table/object, got \[1, 2\]"),
    ('{"shard": "x"}', r":2: sample_id: required key is missing \(and 18 more problem\(s\): .*fresh --output-dir"),
    (json.dumps({**fields(0), "sha256": "0" * 64, "bytes": 1, "sample_index": True}),
     r":2: sample_index: must be an integer, got True"),
    (json.dumps({**fields(0), "sha256": "0" * 64, "bytes": 1, "future_key": 1}), None),  # newer writers may add keys
])
def test_malformed_index_lines_name_the_line(tmp_path, line, match):
    make_store(tmp_path, 1)
    with open(tmp_path / INDEX_NAME, "a") as fh:
        fh.write(line + "\n")
    if match is None:
        assert len(read_index(tmp_path)) == 2
        return
    with pytest.raises(BadInputError, match=match):
        read_index(tmp_path)


def test_index_rows_cannot_point_outside_their_folder(tmp_path):
    row = {**fields(0), "sha256": "0" * 64, "bytes": 1, "shard": "../../etc/passwd"}
    (tmp_path / INDEX_NAME).write_text(json.dumps(row) + "\n")
    with pytest.raises(BadInputError, match="plain file name"):
        read_index(tmp_path)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="index file not found"):
        read_index(tmp_path / "nope" / INDEX_NAME)


def test_our_bytes_read_back_with_the_safetensors_library(tmp_path):
    """Oracle: the reference reader decodes what our writer laid out, for every stored dtype."""
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.randn(2, 3).to(torch.bfloat16),
               "c": torch.randn(4).to(torch.float16), "input_ids": torch.tensor([5, 6, 7]),
               "e": torch.zeros(0, 4), "m": torch.tensor([True, False])}
    path = tmp_path / "x.safetensors"
    path.write_bytes(serialize_shard(tensors, {"z": "1", "a": "2"}))
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"z": "1", "a": "2"}
        for k, v in tensors.items():
            got = fh.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k


def test_golden_bytes_are_stable():
    data = serialize_shard({"input_ids": torch.tensor([1, 2], dtype=torch.int64)}, {"b": "2", "a": "1"})
    expected_header = b'{"__metadata__":{"a":"1","b":"2"},"input_ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}'
    padded = expected_header + b" " * (-len(expected_header) % 8)
    assert data == struct.pack("<Q", len(padded)) + padded + struct.pack("<2q", 1, 2)
