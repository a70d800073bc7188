"""Crash and cancel with real processes on the scaled-out stack (tests/scale/conftest.py).

SIGKILL a gpu worker (and its flow-run process) in the middle of a partition: the zombie
automation of deployments/setup_pools.sh marks that run Crashed once its heartbeats stop, the
parent dispatches the partition again under a new key (`…-p<i>-a2`), and the final index is
complete with nothing duplicated. Cancelling a pipeline ends its gpu children Cancelled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.store.shards import read_index
from lib.store.validation import validate_indexes
from tests.e2e.harness import PREFECT
from tests.scale.stack import INFO_LOGS

TEXTS = [f"Stop {i}: the old market hall, its iron roof and the flower stalls." for i in range(12)]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`: the worker starts flow runs from other threads, so read the
    children of each of its threads, not only of the main one."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


async def _capture_runs(client, needle: str):
    from prefect.client.schemas.filters import FlowRunFilter

    dep = await client.read_deployment_by_name("capture/gpu")
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [dep.id]}))
    # the run's name, or its output folder (a capture outside a run folder is named after the model)
    return [r for r in runs if needle in r.name or needle in str(r.parameters.get("output_dir", ""))]


def _wait(what: str, check, timeout: float = 300, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout} s")


def _restart_gpu_worker(stack, i: int) -> None:
    log = open(stack.work / f"worker-gpu-{i}.restarted.log", "w")
    stack.workers.append(subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "gpu", "--name", f"gpu-{i}", "--limit", "1"],
        env={**stack.env, **INFO_LOGS, "CUDA_VISIBLE_DEVICES": str(i)},
        cwd=stack.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))


@pytest.mark.slow
def test_sigkilled_worker_partition_is_crashed_and_dispatched_again(scale_stack, make_tiny):
    from tests.scale.test_e2e_scale import ran_on

    model = str(make_tiny("qwen3"))
    (scale_stack.sections / "sleep").write_text("4")  # 3 batches: ≥ 12 s per partition, time to kill one
    victim_worker = scale_stack.workers[1]  # gpu-1 (tests/scale/stack.workers: gpu-0, gpu-1, cpu-0)
    code = ("from flows.capture import capture_flow\n"
            f"capture_flow(model={model!r}, output_dir='runs/crash/acts', texts={TEXTS!r}, batch_size=2, partitions=2,"
            " use_deployments=True)")
    with open(scale_stack.work / "crash-parent.log", "w") as log:
        parent = subprocess.Popen([sys.executable, "-c", code], env=scale_stack.env, cwd=scale_stack.home,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        def running_on_gpu1():
            runs = scale_stack.client(lambda c: _capture_runs(c, "runs/crash/"))
            return [r for r in runs if r.state.is_running() and "worker-gpu-1" in ran_on(scale_stack, r.id)]

        victim = _wait("a partition running on gpu-1", running_on_gpu1, timeout=300)[0]
        time.sleep(3)  # inside its first GPU section
        for pid in [victim_worker.pid, *_descendants(victim_worker.pid)]:
            os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        assert parent.wait(timeout=480) == 0, (scale_stack.work / "crash-parent.log").read_text()[-4000:]
        took = time.time() - t_kill
    finally:
        if parent.poll() is None:
            parent.kill()
        (scale_stack.sections / "sleep").unlink()
        _restart_gpu_worker(scale_stack, 1)
    runs = scale_stack.client(lambda c: _capture_runs(c, "runs/crash/"))
    crashed = [r for r in runs if r.id == victim.id][0]
    assert crashed.state.is_crashed(), crashed.state
    again = [r for r in runs if r.parameters.get("partition") == victim.parameters["partition"] and r.id != victim.id]
    assert len(again) == 1 and again[0].state.is_completed(), [(r.name, r.state.name) for r in again]
    assert again[0].idempotency_key.endswith(f"-p{victim.parameters['partition']}-a2"), again[0].idempotency_key
    acts = scale_stack.home / "runs" / "crash" / "acts"
    rows = read_index(acts)
    assert sorted(r.sample_index for r in rows) == list(range(12)), "an index row is missing or doubled"
    assert all(c.ok for c in validate_indexes([acts]))
    print(f"SIGKILL → parent done in {took:.1f} s (zombie detection + the partition again)")


@pytest.mark.slow
def test_cancelling_the_pipeline_cancels_its_gpu_children(scale_stack, make_tiny):
    from prefect.states import Cancelling

    config = {"run_id": "cancel", "teacher": str(make_tiny("qwen3", seed=1)), "student": str(make_tiny("qwen3", seed=2)),
              "limit": 8, "max_length": 24, "batch_size": 2, "partitions": 2}
    (scale_stack.sections / "sleep").write_text("20")  # the partitions are still busy when the cancel comes

    async def start(client):
        from prefect.deployments import run_deployment

        return await run_deployment("pipeline/cpu", parameters={"config": config}, timeout=0)

    try:
        pipe = scale_stack.client(start)
        _wait("a running partition of the pipeline", lambda: [r for r in scale_stack.client(
            lambda c: _capture_runs(c, "-cancel-")) if r.state.is_running()], timeout=300)
        t0 = time.time()
        scale_stack.client(lambda c: c.set_flow_run_state(pipe.id, Cancelling(message="test: cancel the pipeline")))

        def all_final():  # the pipeline too: its cpu worker stops it and marks it Cancelled
            kids = scale_stack.client(lambda c: _capture_runs(c, "-cancel-"))
            done = scale_stack.client(lambda c: c.read_flow_run(pipe.id)).state.is_final()
            return kids if done and kids and all(r.state.is_final() for r in kids) else None

        kids = _wait("every child final", all_final, timeout=180)
        took = time.time() - t0
    finally:
        (scale_stack.sections / "sleep").unlink()
    parent = scale_stack.client(lambda c: c.read_flow_run(pipe.id))
    assert parent.state.is_cancelled(), parent.state
    assert kids and all(r.state.is_cancelled() for r in kids), [(r.name, r.state.name) for r in kids]
    assert not (scale_stack.home / "runs" / "cancel" / "rotations").exists(), "the pipeline went on after the cancel"
    print(f"cancel → {len(kids)} child run(s) Cancelled in {took:.1f} s")
