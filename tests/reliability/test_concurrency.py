"""Concurrent writers: two captures into one folder with overlapping samples, and two processes
appending to one ledger.

Every shard write is a rename into the folder, so inotify counts writes exactly, whichever
process made them: each shard must be written once, and the index must hold each capture key
once with every row's shard valid.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from lib.store.ledgers import read_ledger
from lib.store.shards import read_index, shard_name
from lib.store.validation import validate_indexes
from tests.reliability.helpers import ROOT, RenameCounter, index_problems, spawn, worker_cmd


def _check_store(out: Path, n: int, writes) -> None:
    assert index_problems(out) == []
    rows = read_index(out)
    assert len(rows) == n and len({r.capture_key for r in rows}) == n
    assert sorted(r.shard for r in rows) == [shard_name(i) for i in range(n)]
    assert all(c.ok for c in validate_indexes([out]))
    twice = {k: v for k, v in writes.items() if v != 1}
    assert twice == {}, f"shards written more than once: {twice}"
    assert set(writes) == {shard_name(i) for i in range(n)}
    assert not list(out.glob(".tmp-*")), "temp files left behind"


def test_two_capture_processes_into_one_folder_with_overlapping_samples(make_tiny, tmp_path):
    """A captures the first 24 blurbs (batches of 3), B the first 36 (batches of 2), at once: the
    first 24 overlap (same texts, same capture keys), and both sort longest-first, so they race
    for the same samples."""
    model = make_tiny("qwen3")
    out = tmp_path / "acts"
    out.mkdir()
    with RenameCounter(out) as renames:
        barrier = tmp_path / "barrier"
        a = spawn(worker_cmd("capture", "--model", model, "--out", out, "--limit", 24, "--batch-size", 3,
                             "--barrier", barrier))
        b = spawn(worker_cmd("capture", "--model", model, "--out", out, "--limit", 36, "--batch-size", 2,
                             "--barrier", barrier))
        (a_out, a_err), (b_out, b_err) = a.communicate(timeout=300), b.communicate(timeout=300)
        assert a.returncode == 0, a_err
        assert b.returncode == 0, b_err
        writes = renames.shard_writes()
    _check_store(out, 36, writes)
    ma, mb = json.loads(a_out.splitlines()[-1]), json.loads(b_out.splitlines()[-1])
    ta, tb = ma["commit_times"], mb["commit_times"]
    assert len(ta) > 1 and len(tb) > 1, "a writer committed nothing: the race was not run"
    # [first commit started, last commit done] of each writer: the intervals must overlap
    assert max(ta[0], tb[0]) < min(ta[-1], tb[-1]), (
        f"the two writers did not overlap in time (A committed {ta[0]:.3f}..{ta[-1]:.3f}, B {tb[0]:.3f}..{tb[-1]:.3f})")
    # Both planned their samples before the other had written much; the lock + recheck made the
    # loser of each race skip its commit (and, between batches, its forward pass).
    print(f"\ntwo run_capture processes, overlap 24 of 36: planned {ma['n_computed']} + {mb['n_computed']}, "
          f"written {sum(writes.values())} shard(s) (each once), index 36 rows, 0 duplicates")


@pytest.mark.slow
def test_two_capture_flow_runs_into_one_folder(prefect_server, make_tiny, tmp_path):
    """The same with two `tourguide capture` flow runs against one Prefect server."""
    model = make_tiny("qwen3")
    out = tmp_path / "acts"
    out.mkdir()
    base = [sys.executable, "-m", "flows", "capture", "--model", str(model), "--output-dir", str(out)]
    # Each process's first commit waits for the other (tests/reliability/barrier_site): a real race.
    site = Path(__file__).parent / "barrier_site"
    env = {**prefect_server.client_env(), "TOURGUIDE_TEST_BARRIER": str(tmp_path / "barrier"),
           "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    with RenameCounter(out) as renames:
        a = spawn([*base, "--limit", "12", "--batch-size", "3"], **env)
        b = spawn([*base, "--limit", "16", "--batch-size", "2"], **env)
        (a_out, a_err), (b_out, b_err) = a.communicate(timeout=300), b.communicate(timeout=300)
        assert a.returncode == 0, a_err[-3000:]
        assert b.returncode == 0, b_err[-3000:]
        writes = renames.shard_writes()
    _check_store(out, 16, writes)
    assert re.search(r"12 sample\(s\)", a_out) and re.search(r"16 sample\(s\)", b_out)
    # From the API: the two flow runs' capture-batch task runs were in flight at the same time.
    from datetime import datetime

    from tests.reliability.conftest import api_post

    runs = [r for r in api_post(prefect_server, "/flow_runs/filter", {"limit": 200})
            if r["parameters"].get("output_dir") == str(out)]
    assert len(runs) == 2, f"expected the two capture flow runs, found {len(runs)}"
    spans = []
    for r in runs:
        tasks = api_post(prefect_server, "/task_runs/filter",
                         {"flow_runs": {"id": {"any_": [r["id"]]}}, "limit": 200})
        batch = [t for t in tasks if t["task_key"].startswith("capture_batch") or t["name"].startswith("capture-")]
        assert batch, f"flow run {r['name']} ran no capture batch"
        spans.append((min(datetime.fromisoformat(t["start_time"]) for t in batch if t["start_time"]),
                      max(datetime.fromisoformat(t["end_time"]) for t in batch if t["end_time"])))
    (a0, a1), (b0, b1) = spans
    assert max(a0, b0) < min(a1, b1), f"the two flow runs' batches did not overlap in time: {spans}"


@pytest.mark.parametrize("name", ["ledgers/shards", "shards.jsonl"])
def test_two_processes_append_to_one_ledger(tmp_path, name):
    path = tmp_path / name
    appends, rows = 30, 4
    procs = [spawn(worker_cmd("ledger", "--path", path, "--writer", w, "--appends", appends, "--rows", rows))
             for w in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    table = read_ledger(path, "shards")
    want = {f"{w}-{i}-{j}" for w in "ab" for i in range(appends) for j in range(rows)}
    assert len(table) == len(want) and set(table["shard"]) == want
    if path.suffix != ".jsonl":
        assert len(list(path.glob("part-*.parquet"))) == 2 * appends and not list(path.glob(".tmp-*"))
    else:
        assert all(json.loads(line) for line in path.read_text().splitlines())
