"""The scaled-out stack for tests: a fresh PostgreSQL database per use, `deployments/server.sh` on a
free loopback port (optionally --split with Redis messaging), and `deployments/workers.sh`-style
workers; every process stopped and the database dropped when the block ends.

PostgreSQL 15 runs at 127.0.0.1:5432 (trust, user postgres) on the development and CI machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.harness import PREFECT, ROOT, free_port, stop, wait_ready

PG = os.environ.get("TOURGUIDE_PG", "postgresql://postgres@127.0.0.1:5432")
# INFO logs on the console: a worker's log then names every flow run it submits (tests read it);
# tests/conftest.py sets PREFECT_LOGGING_LEVEL=WARNING for the test process and its children.
INFO_LOGS = {"PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"}


def _pg(sql: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG + "/postgres", timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def database_exists(name: str) -> bool:
    import asyncpg

    async def go() -> bool:
        conn = await asyncpg.connect(PG + "/postgres", timeout=10)
        try:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
        finally:
            await conn.close()

    return asyncio.run(go())


def drop_database(name: str) -> None:
    _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_server(workdir: Path, split: bool = False, extra_env: dict[str, str] | None = None
              ) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (api url, client env) of a server on a database of its own, dropped afterwards."""
    db = f"tg_test_{uuid.uuid4().hex[:12]}"
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "TOURGUIDE_PG": PG, **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    log_path = workdir / "server.log"
    cmd = ["bash", str(ROOT / "deployments" / "server.sh"), "--db", db, "--port", str(port)] + (["--split"] if split else [])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**env, "PREFECT": PREFECT, "PY": str(Path(PREFECT).parent / "python")},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_ready(url, proc, log_path)
            yield url, {**env, "PREFECT_API_URL": url}
        finally:
            stop(proc)
            drop_database(db)


@contextlib.contextmanager
def workers(env: dict[str, str], logs_dir: Path, n_gpu: int = 2, n_cpu: int = 1, heartbeat: int = 30,
            cwd: Path = ROOT, extra_env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen]]:
    """`n_gpu` gpu workers (CUDA_VISIBLE_DEVICES=i, --limit 1) + `n_cpu` cpu workers, as
    deployments/workers.sh starts them, but one Popen each so a test can SIGKILL one."""
    procs, logs = [], []
    wenv = {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat), **INFO_LOGS, **(extra_env or {})}
    try:
        for pool, n in (("gpu", n_gpu), ("cpu", n_cpu)):
            for i in range(n):
                log = open(logs_dir / f"worker-{pool}-{i}.log", "w")
                logs.append(log)
                args = [PREFECT, "worker", "start", "--pool", pool, "--name", f"{pool}-{i}"] + (["--limit", "1"] if pool == "gpu" else [])
                procs.append(subprocess.Popen(args, env={**wenv, "CUDA_VISIBLE_DEVICES": str(i)} if pool == "gpu" else wenv,
                                              cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield procs
    finally:
        for p in procs:
            stop(p)
        for log in logs:
            log.close()
