"""The background shard writer (lib.capture.writer) as run_capture uses it: the same bytes and
row order as a synchronous capture, real overlap, a bound on batches in flight, and a write
failure that surfaces in the caller without leaving a partial shard in the index."""

from __future__ import annotations

import errno
import threading
import time

import pytest

import lib.capture.run as run
import lib.store.shards as shards
from lib.capture.plan import batches_by_length, pending_items, plan_capture
from lib.capture.run import capture_items, run_capture
from lib.capture.spec import CaptureSpec
from lib.capture.writer import ShardWriter
from lib.store.corpus import load_texts
from lib.store.shards import INDEX_NAME, read_index, shard_name
from tests.reliability.helpers import index_problems

N = 10


@pytest.fixture(scope="module")
def spec(make_tiny) -> CaptureSpec:
    return CaptureSpec(model=str(make_tiny("qwen3")), batch_size=3, max_length=24)


@pytest.fixture(scope="module")
def synchronous(spec, tmp_path_factory):
    """The oracle: the pre-writer code path, each batch committed before the next forward."""
    out = tmp_path_factory.mktemp("sync") / "acts"
    plan = plan_capture(spec, load_texts(limit=N))
    out.mkdir(parents=True)
    for batch in batches_by_length(pending_items(plan, out), spec.batch_size):
        assert capture_items(spec, plan, batch, out)  # writer=None: rows returned when committed
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("sample_") or p.name == INDEX_NAME}


def test_overlapped_capture_writes_the_same_bytes_and_row_order(spec, synchronous, tmp_path, monkeypatch):
    events: list[tuple[str, float]] = []
    forward, commit = run.forward_items, run.commit_shards

    def slow_commit(*a, **kw):  # a slow disk: makes the overlap (and any reordering) visible
        events.append(("commit-start", time.perf_counter()))
        time.sleep(0.3)
        result = commit(*a, **kw)
        events.append(("commit-end", time.perf_counter()))
        return result

    def timed_forward(*a, **kw):
        events.append(("forward", time.perf_counter()))
        return forward(*a, **kw)

    monkeypatch.setattr(run, "commit_shards", slow_commit)
    monkeypatch.setattr(run, "forward_items", timed_forward)
    out = tmp_path / "acts"
    manifest = run_capture(spec, load_texts(limit=N), out)
    assert manifest["n_computed"] == N
    # byte-identical shards AND index (rows in the same order) as the synchronous oracle
    assert _files(out) == _files(synchronous)
    assert [r.shard for r in read_index(out)] == [r.shard for r in read_index(synchronous)]
    # it really overlapped: some forward started while an earlier batch's commit was running
    kinds = [k for k, _ in events]
    open_commit, overlapped = False, 0
    for k in kinds:
        open_commit = {"commit-start": True, "commit-end": False}.get(k, open_commit)
        overlapped += k == "forward" and open_commit
    assert overlapped >= 1, kinds


def test_an_injected_write_failure_surfaces_and_leaves_no_partial_shard_indexed(spec, synchronous, tmp_path,
                                                                                  monkeypatch):
    real = shards.write_bytes_atomic
    bad = shard_name(sorted(r.sample_index for r in read_index(synchronous))[5])

    def failing(path, data, *a, **kw):
        if path.name == bad:
            raise OSError(errno.EIO, "Input/output error (injected)", str(path))
        return real(path, data, *a, **kw)

    monkeypatch.setattr(shards, "write_bytes_atomic", failing)
    out = tmp_path / "acts"
    with pytest.raises(OSError) as err:
        run_capture(spec, load_texts(limit=N), out)
    assert err.value.errno == errno.EIO  # the original error, type and errno kept
    assert any(bad in note for note in getattr(err.value, "__notes__", [])), err.value.__notes__
    assert index_problems(out) == []
    rows = read_index(out)
    reference = read_index(synchronous)
    assert bad not in {r.shard for r in rows}
    # the writer stopped at the failing batch: what is indexed is a prefix of the oracle's rows
    assert [r.to_json() for r in rows] == [r.to_json() for r in reference[: len(rows)]]
    assert len(rows) < N and not list(out.glob(".tmp-*"))

    monkeypatch.setattr(shards, "write_bytes_atomic", real)  # negative control: resume completes
    manifest = run_capture(spec, load_texts(limit=N), out)
    assert manifest["n_computed"] == N - len(rows)
    assert {r.shard: r.sha256 for r in read_index(out)} == {r.shard: r.sha256 for r in reference}


def test_the_writer_holds_at_most_two_batches_and_keeps_their_order():
    gate = threading.Event()
    done: list[int] = []

    def job(i):
        def run_job():
            gate.wait(10)
            done.append(i)
            return [{"i": i}]
        return run_job

    w = ShardWriter(max_pending=2)
    w.submit(job(0), ["a"])
    w.submit(job(1), ["b"])
    third = threading.Thread(target=w.submit, args=(job(2), ["c"]))
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a third batch was accepted while two were in flight"
    gate.set()
    third.join(10)
    assert w.close() == [{"i": 0}, {"i": 1}, {"i": 2}] and done == [0, 1, 2]


def test_a_writer_failure_is_sticky():
    def boom():
        raise ValueError("disk said no")

    w = ShardWriter()
    w.submit(boom, ["sample_0007.safetensors"])
    time.sleep(0.2)
    ran = []
    with pytest.raises(ValueError, match="disk said no") as err:
        w.submit(lambda: ran.append(1) or [], ["sample_0008.safetensors"])
        w.close()
    assert "sample_0007.safetensors" in " ".join(err.value.__notes__)
    with pytest.raises(ValueError):
        w.close()  # still raised: nothing after the failure is silently accepted
    assert ran == []
