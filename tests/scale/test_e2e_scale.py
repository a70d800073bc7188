"""CI end to end on the scaled-out stack (tests/scale/conftest.py): a PostgreSQL-backed server, two
gpu process workers and one cpu worker, `prefect deployment run pipeline/cpu` with 2 capture
partitions, start to finish. Asserts through the API and the files: the pipeline and every child
completed, each side's capture ran as two `capture/gpu` partition runs on two different workers,
QA's captures went to the gpu pool, the merged indexes are complete with no duplicates, and the
server kept its state in PostgreSQL (no SQLite file)."""

from __future__ import annotations

import json
import time

import pytest

from lib.store.shards import read_index
from lib.store.validation import validate_indexes
from tests.e2e.harness import PREFECT


async def _runs(client):
    from prefect.client.schemas.filters import FlowRunFilter

    out = {}
    for name in ("pipeline/cpu", "capture/gpu", "fold/gpu"):
        dep = await client.read_deployment_by_name(name)
        out[name] = await client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [dep.id]}))
    return out


def ran_on(stack, run_id) -> set[str]:
    """Names of the workers whose log mentions submitting this flow run."""
    # a worker restarted by the crash test logs to worker-gpu-<i>.restarted.log: still worker gpu-<i>
    return {p.name.removesuffix(".log").removesuffix(".restarted") for p in stack.work.glob("worker-gpu-*.log")
            if str(run_id) in p.read_text()}


@pytest.mark.slow
def test_partitioned_pipeline_on_postgres_with_two_gpu_workers(scale_stack, make_tiny):
    config = {"run_id": "scale", "teacher": str(make_tiny("qwen3", seed=1)), "student": str(make_tiny("qwen3", seed=2)),
              "limit": 8, "max_length": 24, "batch_size": 2, "partitions": 2}
    t0 = time.perf_counter()
    res = scale_stack.sh(PREFECT, "deployment", "run", "pipeline/cpu", "--params", json.dumps({"config": config}),
                         "--watch", "--watch-timeout", "540", timeout=600)
    took = time.perf_counter() - t0
    assert "Completed" in res.stdout, res.stdout[-3000:]
    runs = scale_stack.client(_runs)
    pipe = [r for r in runs["pipeline/cpu"] if r.name == "pipeline-scale"]
    assert len(pipe) == 1 and pipe[0].state.is_completed()
    mine = [r for r in runs["capture/gpu"] if "-scale-" in r.name]
    names = sorted(r.name for r in mine)
    parts = [r for r in mine if r.name.endswith(("-p0of2", "-p1of2"))]
    assert sorted(r.name for r in parts) == ["capture-scale-student-p0of2", "capture-scale-student-p1of2",
                                             "capture-scale-teacher-p0of2", "capture-scale-teacher-p1of2"], names
    assert {"capture-scale-qa-teacher", "capture-scale-qa-student-folded"} <= set(names), names  # QA on the gpu pool
    assert all(r.state.is_completed() and r.work_pool_name == "gpu" for r in mine), [(r.name, r.state.name) for r in mine]
    assert all(r.parameters.get("partition") in (0, 1) for r in parts)
    workers = set().union(*(ran_on(scale_stack, r.id) for r in parts))
    assert workers == {"worker-gpu-0", "worker-gpu-1"}, f"partitions ran on {workers}, not on both gpu workers"
    for side in ("student", "teacher"):
        acts = scale_stack.home / "runs" / "scale" / "activations" / f"transport-{side}"
        rows = read_index(acts)
        assert sorted(r.sample_index for r in rows) == list(range(8)), "an index row is missing or doubled"
        assert all(c.ok for c in validate_indexes([acts]))
    report = scale_stack.home / "runs" / "scale" / "report.md"
    assert report.exists()
    assert not (scale_stack.work / "server" / "prefect-home" / "prefect.db").exists()
    print(f"partitioned pipeline on the PG stack: {took:.1f} s (deployment run → Completed)")
