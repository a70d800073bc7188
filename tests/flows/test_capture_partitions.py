"""Partitioned capture in-process (subflows under the test harness): the merged index equals a
single-process capture row for row and sha256 for sha256, nothing is computed or indexed twice,
and one partition resumes on its own. The same flow with deployments (concurrent `capture/gpu`
runs on real workers) is covered by tests/scale/test_e2e_scale.py."""

from __future__ import annotations

import json

import pytest

from flows.capture import capture_flow
from lib.store.shards import shard_name
from lib.store.validation import validate_indexes

TEXTS = [f"Stop {i}: " + " ".join(["the harbour bridge at dusk"] * (1 + i % 5)) for i in range(11)]
VOLATILE = {"created", "created_at", "written_at", "timestamp"}  # none today; a writer may add one


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows), key=lambda r: r["sample_index"])


@pytest.mark.slow
def test_partitions_equal_a_single_capture_and_resume_alone(prefect_harness, make_tiny, tmp_path, count_forwards):
    model = str(make_tiny("qwen3"))
    kw = dict(model=model, texts=TEXTS, batch_size=2, dtype="float32")
    single = capture_flow(output_dir=str(tmp_path / "single"), **kw)
    n_batches = count_forwards["n"]
    assert single["n_computed"] == 11 and n_batches == 6

    parted_dir = tmp_path / "parted"
    parted = capture_flow(output_dir=str(parted_dir), partitions=3, **kw)
    assert count_forwards["n"] - n_batches == n_batches, "partitions computed a batch twice (or skipped one)"
    assert parted["n_samples"] == 11 and parted["n_computed"] == 11
    rows_single, rows_parted = _rows(tmp_path / "single"), _rows(parted_dir)
    assert len(rows_parted) == 11 and len({r["capture_key"] for r in rows_parted}) == 11, "duplicate index rows"
    assert rows_parted == rows_single  # every field, sha256 included
    assert all(c.ok for c in validate_indexes([parted_dir]))

    # One partition resumes on its own: delete a shard of partition 0 and one of partition 2, then
    # re-run partition 2 alone. It recomputes only its own sample; partition 0's stays missing.
    from lib.capture.plan import prepare_capture
    from lib.capture.spec import CaptureSpec

    plan = prepare_capture(CaptureSpec(model=model, batch_size=2), parted_dir, texts=TEXTS, partitions=3)
    sample_of = lambda p: plan["items"][plan["batches"][plan["partitions"][p][0]][0]]["sample_index"]  # noqa: E731
    s0, s2 = sample_of(0), sample_of(2)
    for s in (s0, s2):
        (parted_dir / shard_name(s)).unlink()
    before = count_forwards["n"]
    child = capture_flow(output_dir=str(parted_dir), partitions=3, partition=2, **kw)
    assert count_forwards["n"] - before == 1 and child["n_computed"] == 1
    assert (parted_dir / shard_name(s2)).exists() and not (parted_dir / shard_name(s0)).exists()
    # The whole capture then repairs the rest, and the index is again the single capture's.
    again = capture_flow(output_dir=str(parted_dir), partitions=3, **kw)
    assert again["n_computed"] == 1
    assert _rows(parted_dir) == rows_single


def test_cli_refuses_zero_partitions_before_prefect_starts(tmp_path, capsys, monkeypatch):
    import sys

    from flows.cli import main

    monkeypatch.delitem(sys.modules, "flows.capture", raising=False)  # proves the flow was never imported
    with pytest.raises(SystemExit) as ex:
        main(["capture", "--model", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--partitions", "0"])
    assert ex.value.code == 2
    assert "--partitions 0: must be >= 1" in capsys.readouterr().err
    assert "flows.capture" not in sys.modules
    assert not (tmp_path / "o").exists()
