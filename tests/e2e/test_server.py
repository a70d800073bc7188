"""End to end against a REAL Prefect server: `prefect server start` on a free loopback port with
a temporary PREFECT_HOME, the set-up script, `prefect deploy --all` from deployments/prefect.yaml,
a process worker, and `prefect deployment run 'qa/nightly' --watch` on tiny settings. Asserts
through the Prefect client that the run completed, its artifacts exist and the nightly schedule
is registered. Everything is stopped in `finally` blocks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy at {url} after {timeout}s")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, proc)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        stop(proc)
        log.close()


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_nightly_qa_deployment_on_a_real_server(prefect_server, make_tiny, tmp_path):
    url, env = prefect_server
    env = {**env, "TOURGUIDE_HOME": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PYTHONPATH": str(ROOT)}
    run(["bash", "deployments/setup_pools.sh", "1"], env)
    run(["bash", "deployments/setup_pools.sh", "1"], env)  # idempotent
    run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env, timeout=600)

    # A tiny scaffolded run and eval config (absolute paths: the worker runs from the checkout).
    from lib.store.runs import ScaffoldSpec, scaffold_run

    runs_root = tmp_path / "runs"
    scaffold_run(ScaffoldSpec(run_id="e2e", runs_root=str(runs_root)))
    cfg = {"run_id": "e2e", "runs_root": str(runs_root),
           "teacher": {"name": "teacher", "path": str(make_tiny("qwen3"))},
           "variants": [{"name": "student", "path": str(make_tiny("qwen3", seed=1)), "transports": []}],
           "metrics": ["logit_kl", "hidden_state_cosine", "residual_rms", "surprisal"],
           "dtype": "float32", "device": "cpu", "max_length": 16, "batch_size": 4, "limit": 4}
    cfg_path = tmp_path / "eval.json"
    cfg_path.write_text(json.dumps(cfg))

    # Create the run first (the watcher keeps going in the background), then start a worker
    # with --run-once: it picks up that run, executes it, and exits.
    watch_log = open(tmp_path / "watch.log", "w+")
    watcher = subprocess.Popen([PREFECT, "deployment", "run", "qa/nightly", "--param", f"config={cfg_path}",
                                "--watch", "--watch-timeout", "500"], env=env, cwd=ROOT, stdout=watch_log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    worker_log = open(tmp_path / "worker.log", "w")
    worker = None
    try:
        t0 = time.time()
        while "Created flow run" not in (tmp_path / "watch.log").read_text():
            assert watcher.poll() is None and time.time() - t0 < 120, (tmp_path / "watch.log").read_text()
            time.sleep(0.5)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--run-once"], env=env, cwd=ROOT,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        code = watcher.wait(timeout=560)
        out = (tmp_path / "watch.log").read_text()
        assert code == 0 and "Completed" in out, out[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(watcher)
        stop(worker)
        worker_log.close()
        watch_log.close()

    async def inspect():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter
        from prefect.client.schemas.sorting import FlowRunSort

        async with get_client() as client:
            dep = await client.read_deployment_by_name("qa/nightly")
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [dep.id]}),
                                               sort=FlowRunSort.START_TIME_DESC)
            done = [r for r in runs if r.state and r.state.is_completed()]
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[done[0].id]))) if done else []
            return dep, done, arts

    os.environ["PREFECT_API_URL"] = url  # the client reads settings from the environment
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            dep, done, arts = asyncio.run(inspect())
    finally:
        os.environ.pop("PREFECT_API_URL", None)
    assert done, "no completed qa/nightly flow run"
    crons = [getattr(s.schedule, "cron", None) for s in dep.schedules]
    assert "0 2 * * *" in crons and dep.schedules[0].schedule.timezone == "Europe/London"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert str(dep.concurrency_options.collision_strategy).endswith("CANCEL_NEW")
    assert arts, "the QA run published no artifacts"
    assert (runs_root / "e2e" / "report.md").exists()


@pytest.mark.slow
def test_pipeline_runs_gpu_steps_as_deployments(prefect_server, make_tiny, tmp_path):
    """use_deployments: the pipeline (on the cpu pool) starts capture and fold as `gpu`
    deployments through run_deployment, with idempotency keys; results travel as files."""
    url, env = prefect_server
    env = {**env, "TOURGUIDE_HOME": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    run(["bash", "deployments/setup_pools.sh", "1"], env)
    run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env, timeout=600)
    from lib.demo.planted import plant_student

    teacher = make_tiny("qwen3")
    student = tmp_path / "student"
    plant_student(teacher, student, noise=0.0, seed=5)
    cfg = {"run_id": "pipe", "runs_root": str(tmp_path / "runs"), "teacher": str(teacher), "student": str(student),
           "limit": 6, "max_length": 16, "batch_size": 8, "device": "cpu", "use_deployments": True}
    logs = [open(tmp_path / f"worker-{p}.log", "w") for p in ("cpu", "gpu")]
    workers = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--limit", "1"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
               for pool, log in zip(("cpu", "gpu"), logs, strict=True)]
    try:
        res = run([PREFECT, "deployment", "run", "pipeline/cpu", "--param", f"config={json.dumps(cfg)}", "--watch",
                   "--watch-timeout", "500"], env, timeout=560)
        assert "Completed" in res.stdout, res.stdout[-2000:]
    finally:
        for w in workers:
            stop(w)
        for log in logs:
            log.close()
    report = json.loads((tmp_path / "runs" / "pipe" / "checkpoints" / "student-folded" / "fold_report.json").read_text())
    assert report["status"] == "passed"
    assert (tmp_path / "runs" / "pipe" / "report.md").exists()

    async def children():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter
        from prefect.deployments import run_deployment

        async with get_client() as client:
            out = {}
            for name in ("capture/gpu", "fold/gpu"):
                dep = await client.read_deployment_by_name(name)
                out[name] = await client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [dep.id]}))
            # the same idempotency key never starts a second child run
            a = await run_deployment("report/cpu", parameters={"run_id": "pipe", "runs_root": cfg["runs_root"]},
                                     idempotency_key="e2e-once", timeout=0)
            b = await run_deployment("report/cpu", parameters={"run_id": "pipe", "runs_root": cfg["runs_root"]},
                                     idempotency_key="e2e-once", timeout=0)
            return out, a.id, b.id

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        runs, first, second = asyncio.run(children())
    assert len(runs["capture/gpu"]) == 2 and all(r.state.is_completed() for r in runs["capture/gpu"])
    assert {r.work_pool_name for r in runs["capture/gpu"] + runs["fold/gpu"]} == {"gpu"}
    assert len(runs["fold/gpu"]) == 1 and runs["fold/gpu"][0].state.is_completed()
    assert first == second
