"""lib.fold.write_behind: the fold's writes on a background thread — same bytes as writing in
line, a bounded queue, and errors that reach the caller."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lib.fold.checkpoint_io import CheckpointReader, ShardedWriter, TensorEntry
from lib.fold.write_behind import WriteBehind
from lib.store.safetensors_io import save_tensors

TENSORS = {"a": torch.randn(64, 8), "b": torch.randn(33).to(torch.bfloat16), "c": torch.arange(10)}
ENTRIES = [TensorEntry("a", "F32", (64, 8)), TensorEntry("b", "BF16", (33,)), TensorEntry("c", "I64", (10,))]


def _source(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    save_tensors(folder / "model.safetensors", {"c": TENSORS["c"]}, {"format": "pt"})
    (folder / "config.json").write_text("{}")
    return CheckpointReader(folder)


def _write(w, reader):
    w.begin("a")
    for k in range(0, 64, 24):
        w.write_part(TENSORS["a"][k:k + 24])
    w.write("b", TENSORS["b"])
    w.copy_raw("c", reader, "c")
    return w.close()


def test_write_behind_writes_the_same_bytes_as_the_writer_in_line(tmp_path):
    reader = _source(tmp_path)
    for name in ("inline", "behind"):
        (tmp_path / name).mkdir()
    _write(ShardedWriter(tmp_path / "inline", ENTRIES, max_shard_bytes=2100), reader)
    index = _write(WriteBehind(ShardedWriter(tmp_path / "behind", ENTRIES, max_shard_bytes=2100), max_bytes=1000), reader)
    files = sorted(p.name for p in (tmp_path / "inline").iterdir())
    assert len(files) == 3 and files == sorted(p.name for p in (tmp_path / "behind").iterdir())  # 2 shards + index
    for f in files:
        assert (tmp_path / "inline" / f).read_bytes() == (tmp_path / "behind" / f).read_bytes()
    assert set(index["weight_map"]) == {"a", "b", "c"}


def test_the_queue_holds_at_most_max_bytes(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    writer = ShardedWriter(tmp_path / "out", ENTRIES[:1])
    gate = threading.Event()
    real = writer.write_part
    monkeypatch.setattr(writer, "write_part", lambda t: (gate.wait(), real(t)))
    w = WriteBehind(writer, max_bytes=3 * 8 * 8 * 4)  # three 8-row parts of float32 [*, 8]
    w.begin("a")
    seen, done = [], threading.Event()

    def produce():
        for k in range(0, 64, 8):
            w.write_part(TENSORS["a"][k:k + 8])
            seen.append(w._queued)
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.5)
    assert not done.is_set() and len(seen) == 3  # the fourth part waits for room
    assert max(seen) <= 3 * 256
    gate.set()
    assert done.wait(10)
    w.close()
    assert max(seen) <= 3 * 256


def test_a_writer_error_reaches_the_caller_and_abort_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    w = WriteBehind(ShardedWriter(tmp_path / "out", ENTRIES), max_bytes=1 << 20)
    w.begin("a")
    w.write_part(TENSORS["a"].double())  # planned F32: fails on the writer thread
    with pytest.raises(RuntimeError, match="rows of 'a' are F64, planned F32"):
        for _ in range(100):  # re-raised at the next call once the thread got to it
            w.write_part(TENSORS["a"][:1])
            time.sleep(0.01)
    w.abort()
    assert list((tmp_path / "out").iterdir()) == []

    w = WriteBehind(ShardedWriter(tmp_path / "out", ENTRIES), max_bytes=1 << 20)
    w.write("b", TENSORS["b"])  # out of plan order
    with pytest.raises(RuntimeError, match="expected 'a' next"):
        w.close()
    w.abort()
    assert list((tmp_path / "out").iterdir()) == []
