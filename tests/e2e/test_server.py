"""End to end against a REAL Prefect server (tests/e2e/harness.py: `prefect server start` on a
free loopback port with a temporary PREFECT_HOME): the README's set-up — the demo, the set-up
script, `prefect deploy --all` from deployments/prefect.yaml, a cpu and a gpu worker — then
`prefect deployment run 'qa/nightly' --watch` and `pipeline/cpu` with no parameters at all (their
captures and the fold go to the gpu pool: use_deployments "auto"), and a failing night whose
--watch says why. Asserts through the Prefect client: runs completed, their names, the artifact
keys, the schedule, idempotent child runs. Every process is stopped in `finally` blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.e2e import harness
from tests.e2e.harness import PREFECT, ROOT, stop

# The demo's teacher recipe, small (the demo itself runs as `tourguide demo` does otherwise).
TINY_RECIPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
                   vocab_size=512, steps=25, batch_size=8, max_length=48)


@pytest.fixture
def prefect_server(tmp_path):
    with harness.prefect_server(tmp_path) as server:
        yield server


def run(cmd: list[str], env: dict, timeout: float = 300, cwd: Path = ROOT, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@contextlib.contextmanager
def workers(env: dict, logs_dir: Path, pools: tuple[str, ...] = ("cpu", "gpu")):
    logs = [open(logs_dir / f"worker-{p}.log", "w") for p in pools]
    procs = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--limit", "1"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for pool, log in zip(pools, logs, strict=True)]
    try:
        yield
    finally:
        for w in procs:
            stop(w)
        for log in logs:
            log.close()


def client_call(url: str, fn):
    """`await fn(client)` against the server at `url` (this process's settings point elsewhere)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: url}):
        return asyncio.run(go())


def checkout(tmp_path: Path) -> Path:
    """What workers run as TOURGUIDE_HOME: this checkout's code (links) with a runs/ of its own."""
    home = tmp_path / "checkout"
    home.mkdir()
    for name in ("flows", "tasks", "lib", "samples", "prompts", "deployments", "pyproject.toml"):
        (home / name).symlink_to(ROOT / name)
    return home


@pytest.mark.slow
def test_nightly_qa_and_pipeline_deployments_work_out_of_the_box(prefect_server, tmp_path):
    url, env = prefect_server
    home = checkout(tmp_path)
    env = {**env, "TOURGUIDE_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PYTHONPATH": str(ROOT), "TOURGUIDE_CACHE": str(tmp_path / "cache")}
    # The README's set-up: the demo (a small teacher recipe), the pools, the deployments.
    demo = f"from flows.demo import demo_flow; demo_flow(recipe={TINY_RECIPE!r})"
    t0 = time.perf_counter()
    run([sys.executable, "-c", demo], env, timeout=900, cwd=home)
    took = {"demo": time.perf_counter() - t0}
    assert (home / "runs" / "demo" / "checkpoints" / "teacher").is_symlink()
    run(["bash", "deployments/setup_pools.sh", "1"], env)
    run(["bash", "deployments/setup_pools.sh", "1"], env)  # idempotent
    run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env, timeout=600)
    keys_after_demo = client_call(url, artifact_keys)
    took["set-up"] = time.perf_counter() - t0 - took["demo"]

    watch = ["--watch", "--watch-timeout", "500"]
    with workers(env, tmp_path):
        t1 = time.perf_counter()
        night = run([PREFECT, "deployment", "run", "qa/nightly", *watch], env, timeout=560)
        assert "Completed" in night.stdout, night.stdout[-3000:]
        took["nightly"] = time.perf_counter() - t1
        # The fold of the demo run is current, so the pipeline would reuse it: take its marker away
        # to have pipeline/cpu fold again (on the gpu pool)
        (home / "runs" / "demo" / "checkpoints" / "student-folded" / "pipeline_inputs.json").unlink()
        pipe = run([PREFECT, "deployment", "run", "pipeline/cpu", *watch], env, timeout=560)
        assert "Completed" in pipe.stdout, pipe.stdout[-3000:]
        took["pipeline"] = time.perf_counter() - t1 - took["nightly"]
        # A night that fails says why in --watch (the server streams logs; flows.hooks.log_failure)
        bad = run([PREFECT, "deployment", "run", "qa/nightly", "--param", "config=runs/none.json", *watch], env,
                  timeout=300, ok=False)
        assert bad.returncode != 0 and "Failed" in bad.stdout, bad.stdout[-3000:]
        assert "runs/none.json" in bad.stdout and "file not found" in bad.stdout, bad.stdout[-3000:]
        print("--watch of a failing night, last lines:\n" + "\n".join(bad.stdout.splitlines()[-4:]))

    async def read(client):
        from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import FlowRunSort

        deps = {n: await client.read_deployment_by_name(n)
                for n in ("qa/nightly", "pipeline/cpu", "capture/gpu", "fold/gpu")}
        runs = {n: await client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [d.id]}),
                                               sort=FlowRunSort.START_TIME_DESC) for n, d in deps.items()}
        every = await client.read_flow_runs(limit=200)  # the demo's ~40 runs and the deployments' ~15
        failed = [r for r in runs["qa/nightly"] if r.state and r.state.is_failed()]
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[failed[0].id]))) \
            if failed else []
        # the same idempotency key never starts a second child run (what a retried parent relies on)
        from prefect.deployments import run_deployment

        once = [await run_deployment("report/cpu", parameters={"run_id": "demo"}, idempotency_key="e2e-once",
                                     timeout=0) for _ in range(2)]
        assert once[0].id == once[1].id
        return deps, runs, every, failed, logs

    print("seconds:", {k: round(v, 1) for k, v in took.items()})
    deps, runs, every, failed, logs = client_call(url, read)
    nightly = [r for r in runs["qa/nightly"] if r.state and r.state.is_completed()]
    assert len(nightly) == 1 and len(failed) == 1
    # named after the scheduled date in the schedule's timezone (Europe/London)
    for r in (nightly[0], failed[0]):
        assert r.name == f"nightly-{r.expected_start_time.astimezone(ZoneInfo('Europe/London')):%Y-%m-%d}"
    assert "file not found" in failed[0].state.message
    assert logs and logs[-1].level >= 40 and "runs/none.json" in logs[-1].message  # the reason, last
    assert [r.state.type.value for r in runs["pipeline/cpu"]] == ["COMPLETED"] and runs["pipeline/cpu"][0].name == "pipeline-demo"
    # Started from deployments, QA's and the pipeline's captures ran on the gpu pool (use_deployments auto)
    gpu_names = {r.name for r in runs["capture/gpu"]}
    assert gpu_names == {"capture-demo-student", "capture-demo-teacher", "capture-demo-qa-teacher",
                         "capture-demo-qa-student-baseline", "capture-demo-qa-student-folded"}, gpu_names
    assert [r.name for r in runs["fold/gpu"]] == ["fold-demo-student-folded"]
    assert {r.work_pool_name for r in runs["capture/gpu"] + runs["fold/gpu"]} == {"gpu"}
    assert all(r.state.is_completed() for r in runs["capture/gpu"] + runs["fold/gpu"])
    fold = json.loads((home / "runs" / "demo" / "checkpoints" / "student-folded" / "fold_report.json").read_text())
    assert fold["status"] == "passed"
    # the demo's own runs (in-process) carry the run id too
    names = {r.name for r in every}
    assert {"demo-demo", "scaffold-demo", "capture-demo-student", "capture-demo-teacher", "rotate-demo",
            "fold-demo-student-folded", "qa-demo", "report-demo", "capture-demo-qa-teacher"} <= names, names

    # every artifact the README lists has a key; re-runs add versions, not keys
    keys = client_call(url, artifact_keys)
    assert {"capture-progress-demo-student", "capture-progress-demo-qa-teacher", "checksums-demo-student",
            "checksums-demo-qa-student-folded", "checksums-demo-rotate", "rotations-demo",
            "fold-gate-demo-student-folded", "qa-night-demo", "qa-report-demo", "qa-summary-demo",
            "pipeline-demo", "scaffold-demo"} <= set(keys_after_demo), sorted(keys_after_demo)
    assert set(keys) == set(keys_after_demo), set(keys) ^ set(keys_after_demo)
    assert keys["qa-report-demo"] >= 3  # the demo's, the night's, the pipeline's
    report = client_call(url, lambda c: latest_artifact(c, "qa-report-demo"))
    assert report.data.count("data:image/png;base64,") == 3 and "](figures/" not in report.data

    dep = deps["qa/nightly"]
    crons = [getattr(s.schedule, "cron", None) for s in dep.schedules]
    assert "0 2 * * *" in crons and dep.schedules[0].schedule.timezone == "Europe/London"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert str(dep.concurrency_options.collision_strategy).endswith("CANCEL_NEW")
    assert (home / "runs" / "demo" / "report.md").exists()


async def artifact_keys(client) -> dict[str, int]:
    """{key: number of versions} of every keyed artifact on the server."""
    out: dict[str, int] = {}
    offset = 0
    while page := await client.read_artifacts(limit=200, offset=offset):  # the server's page limit
        for a in page:
            if a.key:
                out[a.key] = out.get(a.key, 0) + 1
        offset += len(page)
    return out


async def latest_artifact(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                       sort=ArtifactSort.CREATED_DESC, limit=1)
    return arts[0]
