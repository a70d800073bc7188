"""Disk full and read-only output, on real file systems: small or read-only tmpfs mounts.

Tests run as root, where chmod does not stop writes, so the faults come from the kernel: a tmpfs
of a few hundred KiB (ENOSPC) and a tmpfs remounted read-only (EROFS). Each test skips with the
reason when mounting is impossible (not root / no CAP_SYS_ADMIN). Must hold: a clear error
naming the path, nothing indexed that is not complete on disk, no torn index line, no half
output folder, and a re-run after the fault is fixed finishes only what is missing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

from flows.cli import main as tourguide
from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.store.corpus import load_texts
from lib.store.shards import (
    INDEX_NAME,
    ShardRecord,
    commit_shards,
    make_payload_record,
    read_index,
    serialize_shard,
    shard_name,
)
from lib.store.validation import validate_indexes
from tests.reliability.helpers import RenameCounter, index_problems, remount, tmpfs, tree_diff, tree_state

N = 12


@pytest.fixture(scope="module")
def spec(make_tiny) -> CaptureSpec:
    return CaptureSpec(model=str(make_tiny("qwen3")), batch_size=1, max_length=32)  # ~100 KB per shard


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("disk-ref") / "acts"
    run_capture(spec, load_texts(limit=N), out)
    return {r.shard: r.sha256 for r in read_index(out)}


def test_capture_on_a_disk_that_fills_up_then_resumes(spec, reference, tmp_path):
    """ENOSPC at five different points (the disk grows a little after each failure), each
    followed by a resume; then enough space: exactly the missing shards are written."""
    with tmpfs(tmp_path / "disk", "150k") as disk:
        out = disk / "acts"
        failures = []
        for size in ("150k", "400k", "650k", "900k", "1150k"):
            remount(disk, f"size={size}")
            before = {r.shard for r in read_index(out)} if (out / INDEX_NAME).exists() else set()
            with pytest.raises(OSError) as err:
                run_capture(spec, load_texts(limit=N), out)
            assert err.value.errno == errno.ENOSPC
            assert index_problems(out) == [], f"after ENOSPC at {size}: {index_problems(out)}"
            assert not list(out.glob(".tmp-*")), "a temp file survived the failed write"
            rows = {r.shard: r.sha256 for r in read_index(out)} if (out / INDEX_NAME).exists() else {}
            assert rows.items() <= reference.items() and before <= set(rows)
            failures.append(len(rows))
        assert failures == sorted(failures) and failures[-1] > failures[0], failures

        remount(disk, "size=8m")
        with RenameCounter(out) as renames:
            manifest = run_capture(spec, load_texts(limit=N), out)
            written = renames.shard_writes()
        assert manifest["n_computed"] == N - failures[-1]
        assert set(written) == set(reference) - set(rows) and max(written.values()) == 1
        assert {r.shard: r.sha256 for r in read_index(out)} == reference
        print(f"\nENOSPC at {len(failures)} points (after {failures} shards): 0 dangling rows, 0 torn lines, "
              f"0 temp files; resume wrote {len(written)} shard(s), exactly the missing ones")


def _record(i: int, pad: int = 0) -> tuple[ShardRecord, bytes]:
    t = {"input_ids": torch.arange(3, dtype=torch.int64), "act/model.layers.0": torch.ones(3, 4) * i}
    payload = serialize_shard(t, {"sample_id": f"s{i}"})
    fields = dict(shard=shard_name(i), sample_id=f"s{i}", sample_index=i, text_sha256="ab" * 32, token_start=3 * i,
                  token_end=3 * i + 3, n_tokens=3, truncated=False, layers=["model.layers.0"], dtype="float32",
                  shapes={"input_ids": [3], "act/model.layers.0": [3, 4]}, model="m", revision="r", tokenizer="m",
                  backend="torch", capture_key=f"key{i}", capture_version="1", logits=False,
                  extra={"pad": "x" * pad} if pad else {})
    return make_payload_record(fields, payload), payload


def test_an_index_append_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path):
    """The shard fits, its index line does not: the line must not be left half-written (a torn
    last line makes the index unreadable and the capture unresumable), and the error is raised."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "acts"
        out.mkdir()
        pad = 4096 - 60 - (len(_record(0, 1)[0].to_json() + "\n") - 1)  # the index ends 60 bytes short of a page
        commit_shards(out, [_record(0, pad)])
        assert (out / INDEX_NAME).stat().st_size == 4096 - 60
        rec, payload = _record(1)
        st = os.statvfs(disk)
        filler = st.f_bavail * st.f_frsize - 4096  # leave exactly one page: the shard's
        (disk / "filler").write_bytes(b"\0" * filler)
        with pytest.raises(OSError) as err:
            commit_shards(out, [(rec, payload)])
        assert err.value.errno == errno.ENOSPC
        assert (out / INDEX_NAME).stat().st_size == 4096 - 60, "a partial line was left in the index"
        assert [r.shard for r in read_index(out)] == [shard_name(0)]
        assert index_problems(out) == []
        (disk / "filler").unlink()  # space again: the same commit now completes
        assert commit_shards(out, [(rec, payload)]) == [rec]
        assert [r.shard for r in read_index(out)] == [shard_name(0), shard_name(1)]
        assert all(c.ok for c in validate_indexes([out]))


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        tourguide(list(argv))
    return exit_.value.code


def test_read_only_output_fails_clearly_and_indexes_nothing(spec, reference, tmp_path, monkeypatch, capsys):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "acts"
        run_capture(spec, load_texts(limit=4), out)
        (disk / "empty").mkdir()
        remount(disk, "ro")
        try:
            before = tree_state(disk)
            with pytest.raises(OSError) as err:
                run_capture(spec, load_texts(limit=N), out)
            assert err.value.errno == errno.EROFS and str(out) in str(err.value)
            with pytest.raises(OSError) as err:
                run_capture(spec, load_texts(limit=N), disk / "empty")
            assert err.value.errno == errno.EROFS
            assert tree_diff(before, tree_state(disk)) == []
            assert len(read_index(out)) == 4 and index_problems(out) == []
            monkeypatch.delenv("PREFECT_API_URL", raising=False)
            assert cli("validate", str(out)) == 0  # reading a read-only capture still works
            assert "4 shard(s), 0 bad" in capsys.readouterr().out
        finally:
            remount(disk, "rw")


def test_cli_reports_a_read_only_output_folder_in_one_line(prefect_harness, spec, tmp_path, capsys):
    """Through `tourguide capture` (a real flow): no traceback, the path, the reason and the fix."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "acts").mkdir()
        remount(disk, "ro")
        try:
            code = cli("capture", "--model", spec.model, "--output-dir", str(disk / "acts"), "--limit", "2",
                       "--max-length", "8")
            err = capsys.readouterr().err
            assert code == 2, err[-2000:]
            last = err.strip().splitlines()[-1]
            assert last.startswith("tourguide capture: error:") and str(disk / "acts") in last
            assert "Read-only file system" in last and "--output-dir" in last
            assert "Retries are exhausted" not in err, "a read-only disk was retried as if transient"
            assert not list((disk / "acts").iterdir())
        finally:
            remount(disk, "rw")


def test_fold_on_a_full_disk_leaves_no_output_folder(make_tiny, tmp_path):
    from lib.fold.checkpoint import fold_from_spec
    from lib.fold.spec import write_transform_spec
    from lib.testing.random_transforms import random_rotation

    model = make_tiny("qwen3")
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    spec = write_transform_spec(run, json.loads((model / "config.json").read_text()),
                                residual_rotation=random_rotation(128, 5),
                                neuron_permutations={0: np.random.default_rng(5).permutation(256)})
    with tmpfs(tmp_path / "disk", "600k") as disk:
        with pytest.raises(OSError) as err:
            fold_from_spec(model, disk / "rotated", spec)
        assert err.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == [], f"left behind: {list(disk.iterdir())}"
        remount(disk, "size=16m")
        result = fold_from_spec(model, disk / "rotated", spec)
        assert (disk / "rotated" / "config.json").is_file() and result.n_transformed > 0
        shutil.rmtree(disk / "rotated")
