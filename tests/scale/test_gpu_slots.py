"""The `gpu` global concurrency limit, with two real gpu workers running the two partitions of one
capture at once: with 1 slot their GPU sections (capture batches, timed inside the slot by
tests/scale/section_site) never overlap; with 2 slots they do. The second run is the control that
proves the workload can overlap at all."""

from __future__ import annotations

import itertools
import json

import pytest

TEXTS = [f"Stop {i}: the harbour bridge at dusk, the ferries and the gulls." for i in range(12)]


def _sections(stack, out: str) -> dict[int, list[tuple[float, float]]]:
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for line in (stack.sections / "sections.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["out"].endswith(out):
            by_pid.setdefault(row["pid"], []).append((row["start"], row["end"]))
    return by_pid


def _overlaps(by_pid) -> list[tuple]:
    pairs = itertools.combinations([(pid, s) for pid, ss in by_pid.items() for s in ss], 2)
    return [(a, b) for a, b in pairs if a[0] != b[0] and a[1][0] < b[1][1] and b[1][0] < a[1][1]]


@pytest.mark.slow
def test_one_gpu_slot_serialises_sections_two_let_them_overlap(scale_stack, make_tiny):
    model = str(make_tiny("qwen3"))
    (scale_stack.sections / "sleep").write_text("2")  # 3 batches per partition: ≥ 6 s of sections each
    try:
        for slots in (1, 2):
            scale_stack.sh("bash", "deployments/setup_pools.sh", str(slots))
            scale_stack.python(
                "from flows.capture import capture_flow\n"
                f"capture_flow(model={model!r}, output_dir='runs/slots/limit{slots}', texts={TEXTS!r}, batch_size=2,"
                " partitions=2, use_deployments=True)")
    finally:
        (scale_stack.sections / "sleep").unlink()
        scale_stack.sh("bash", "deployments/setup_pools.sh", "2")  # the rest of the session: 2 GPUs
    one, two = _sections(scale_stack, "limit1"), _sections(scale_stack, "limit2")
    # each partition in its own flow-run process, 3 batches each
    assert sorted(map(len, one.values())) == [3, 3] and sorted(map(len, two.values())) == [3, 3], (one, two)
    assert _overlaps(one) == [], f"GPU sections overlapped under a 1-slot limit: {_overlaps(one)}"
    assert _overlaps(two), f"with 2 slots the two partitions never ran at once: {two}"
    print("limit 2 overlap (s):", round(sum(min(a[1][1], b[1][1]) - max(a[1][0], b[1][0]) for a, b in _overlaps(two)), 1))
