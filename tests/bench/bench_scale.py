"""Scale-out benchmarks, each a ratio from one run. Run:
    PYTHONPATH=. .venv/bin/python tests/bench/bench_scale.py [--quick]

S1: capture throughput with 2 gpu process workers vs 1, on the same partitioned workload
    (a random Qwen3-shaped model, partitions=2, OMP/MKL threads = 1 per worker so each worker is
    one core), against a PostgreSQL-backed server (deployments/server.sh). Goal >= 1.7x on 2 cores.
S2: orchestration overhead per partition in seconds: (wall time of the 1-worker partitioned capture
    − the same samples captured in-process by lib.capture.run.run_capture with 1 thread) / partitions,
    next to the work it wraps.
S3: flow-run creation throughput with 8 concurrent clients, PostgreSQL vs SQLite server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def build(work: Path, quick: bool) -> Path:
    from lib.testing.tiny_models import TinySpec, build_tiny_model, train_tokenizer

    tok = train_tokenizer(work / "tok", vocab_size=1024)
    spec = (TinySpec(family="qwen3", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                     intermediate_size=768) if quick else
            TinySpec(family="qwen3", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                     intermediate_size=1536))
    return build_tiny_model(work / "model", spec, tokenizer_dir=tok)


def lib_seconds(model: Path, out: Path, n: int, kw: dict) -> float:
    """The work itself: one process, one thread, no Prefect (model load included, as per partition)."""
    code = ("import time, torch; torch.set_num_threads(1)\n"
            "from lib.capture.run import run_capture\nfrom lib.capture.spec import CaptureSpec\n"
            "from lib.store.corpus import load_texts\n"
            f"s = load_texts(limit={n}); t = time.perf_counter()\n"
            f"run_capture(CaptureSpec(model={str(model)!r}, batch_size={kw['batch_size']}, max_length={kw['max_length']},"
            f" logits=False), s, {str(out)!r}); print('WALL', time.perf_counter() - t)")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return float(res.stdout.split("WALL")[-1])


def partitioned_seconds(env: dict, home: Path, model: Path, out: str, n: int, kw: dict) -> float:
    code = ("import time\nfrom flows.capture import capture_flow\nt = time.perf_counter()\n"
            f"capture_flow(model={str(model)!r}, output_dir={out!r}, limit={n}, batch_size={kw['batch_size']},"
            f" max_length={kw['max_length']}, logits=False, partitions={kw['partitions']}, use_deployments=True)\n"
            "print('WALL', time.perf_counter() - t)")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=home)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return float(res.stdout.split("WALL")[-1])


def s1_s2(work: Path, quick: bool) -> None:
    from tests.e2e.harness import PREFECT
    from tests.e2e.test_server import checkout
    from tests.scale import stack

    work.mkdir(parents=True, exist_ok=True)
    n = 32 if quick else 96
    kw = {"batch_size": 4, "max_length": 64, "partitions": 2}
    model = build(work, quick)
    t_lib = lib_seconds(model, work / "lib-acts", n, kw)
    home = checkout(work)
    with stack.pg_server(work / "server") as (url, env):
        env = {**env, **ONE_THREAD, "TOURGUIDE_HOME": str(home), "PYTHONPATH": str(ROOT),
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
               "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "TOURGUIDE_CACHE": str(work / "cache")}
        for cmd in (["bash", "deployments/setup_pools.sh", "2"],
                    [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]):
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
        walls = {}
        for n_gpu in (1, 2):
            with stack.workers(env, work, n_gpu=n_gpu, n_cpu=0, cwd=home):
                walls[n_gpu] = partitioned_seconds(env, home, model, f"runs/bench/w{n_gpu}", n, kw)
    ratio = walls[1] / walls[2]
    print(json.dumps({"S1": {"samples": n, "partitions": 2, "wall_1_worker_s": round(walls[1], 1),
                             "wall_2_workers_s": round(walls[2], 1), "speedup": round(ratio, 2), "goal": 1.7},
                      "S2": {"lib_in_process_s": round(t_lib, 1),
                             "overhead_per_partition_s": round((walls[1] - t_lib) / kw["partitions"], 1),
                             "work_per_partition_s": round(t_lib / kw["partitions"], 1)}}))


async def _create_runs(url: str, n: int, clients: int) -> float:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="bench-create")
    def noop() -> None: ...

    async def one(k: int) -> None:
        async with get_client() as client:
            for i in range(n // clients):
                await client.create_flow_run(noop, name=f"bench-{k}-{i}")

    with temporary_settings({PREFECT_API_URL: url}):
        async with get_client() as client:  # warm: the flow row exists before the clock starts
            await client.create_flow_run(noop, name="warm")
        t = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return n / (time.perf_counter() - t)


def s3(work: Path, quick: bool) -> None:
    from tests.e2e import harness
    from tests.scale import stack

    work.mkdir(parents=True, exist_ok=True)
    n, clients = (80 if quick else 240), 8
    with stack.pg_server(work / "pg") as (url, _):
        pg = asyncio.run(_create_runs(url, n, clients))
    (work / "sqlite").mkdir()
    with harness.prefect_server(work / "sqlite") as (url, _):
        lite = asyncio.run(_create_runs(url, n, clients))
    print(json.dumps({"S3": {"flow_runs": n, "clients": clients, "postgres_runs_per_s": round(pg, 1),
                             "sqlite_runs_per_s": round(lite, 1), "ratio": round(pg / lite, 2)}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["s1", "s3"], default=None)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        if args.only in (None, "s1"):
            s1_s2(work / "s1", args.quick)
        if args.only in (None, "s3"):
            s3(work / "s3", args.quick)


if __name__ == "__main__":
    main()
