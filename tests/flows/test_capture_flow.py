"""The capture flow under a real (test-harness) Prefect API: caching, recompute, validation."""

from __future__ import annotations

import pytest

from flows.capture import capture_flow
from lib.core.errors import ChecksumError
from lib.store.shards import read_index, shard_name
from lib.store.validation import validate_indexes
from tasks.validate import validate_shards

TEXTS = ["Bondi Beach curves for a kilometre of pale sand.", "悉尼歌剧院的白色风帆倒映在港湾里。",
         "The Louvre's glass pyramid glows at dusk.", "Table Mountain is often wrapped in its tablecloth of cloud."]


def test_second_run_is_served_from_cache_and_damage_is_recomputed(prefect_harness, make_tiny, tmp_path,
                                                                 count_forwards):
    model = str(make_tiny("qwen3"))
    out = tmp_path / "acts"
    kw = dict(model=model, output_dir=str(out), texts=TEXTS, batch_size=2)
    first = capture_flow(**kw)
    assert first["n_computed"] == 4 and first["n_reused"] == 0
    rows = {r.sample_index: r for r in read_index(out)}
    forwards = count_forwards["n"]
    assert forwards == 2, "4 texts in batches of 2 are 2 forward passes"

    second = capture_flow(**kw)
    assert count_forwards["n"] == forwards, "an identical re-run ran a forward pass"
    assert second["n_computed"] == 0 and second["n_reused"] == 4
    assert {r.sample_index: r for r in read_index(out)} == rows

    # delete one shard and corrupt another: exactly those two are recomputed
    (out / shard_name(1)).unlink()
    victim = out / shard_name(3)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    untouched = {i: (out / shard_name(i)).stat().st_mtime_ns for i in (0, 2)}
    third = capture_flow(**kw)
    assert third["n_computed"] == 2
    assert count_forwards["n"] > forwards
    after = read_index(out)
    assert len(after) == 4 and len({r.capture_key for r in after}) == 4, "duplicate index rows"
    assert all(c.ok for c in validate_indexes([out]))
    assert {i: (out / shard_name(i)).stat().st_mtime_ns for i in (0, 2)} == untouched, "healthy shards rewritten"


def test_validation_task_refuses_a_flipped_byte(make_tiny, tmp_path):
    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import Sample

    out = tmp_path / "acts"
    run_capture(CaptureSpec(model=str(make_tiny("llama"))), [Sample(i, f"t{i}", t) for i, t in enumerate(TEXTS)], out)
    assert validate_shards.fn([str(out / "metadata.jsonl")])["n_shards"] == 4
    victim = out / shard_name(2)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=shard_name(2)) as err:
        validate_shards.fn([str(out / "metadata.jsonl")])
    assert shard_name(0) not in str(err.value)


def test_validation_is_never_served_from_a_cache(prefect_harness, make_tiny, tmp_path):
    """Two validations with the same inputs in one flow run: the second must re-hash (a shard
    damaged in between fails it), not return the first one's cached result, even where results
    are persisted by default (a user setting that turns Prefect's default cache policy on)."""
    from prefect import flow
    from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import Sample

    out = tmp_path / "acts"
    run_capture(CaptureSpec(model=str(make_tiny("qwen3"))), [Sample(i, f"t{i}", t) for i, t in enumerate(TEXTS)], out)
    index = str(out / "metadata.jsonl")

    @flow
    def validate_twice() -> str:
        validate_shards([index], label="twice")
        victim = out / shard_name(0)
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0x01
        victim.write_bytes(bytes(raw))
        try:
            validate_shards([index], label="twice")
        except ChecksumError:
            return "caught"
        return "served from cache"

    with temporary_settings(updates={PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        assert validate_twice() == "caught"
