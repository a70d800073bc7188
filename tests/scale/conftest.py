"""One scaled-out stack for the tests in tests/scale that need workers: a PostgreSQL-backed server
(deployments/server.sh, on a database of its own), the pools and the `gpu` limit
(deployments/setup_pools.sh), every deployment of deployments/prefect.yaml, two gpu process
workers (CUDA_VISIBLE_DEVICES=0/1, --limit 1) and one cpu worker. Started once per session (a
start costs ~1–2 minutes on two cores), stopped and the database dropped at the end.

The workers' flow-run processes load tests/scale/section_site (TOURGUIDE_TEST_SECTIONS): every
capture batch's GPU section is timed into <sections>/sections.jsonl.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.harness import PREFECT, ROOT
from tests.scale import stack

SITE = Path(__file__).resolve().parent / "section_site"


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    home: Path  # TOURGUIDE_HOME: this checkout's code (links) with a runs/ of its own
    work: Path
    sections: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    def sh(self, *cmd: str, timeout: float = 600, ok: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if ok:
            assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res

    def python(self, code: str, timeout: float = 600, ok: bool = True) -> subprocess.CompletedProcess:
        """Run `code` in a fresh interpreter against this server (cwd: the checkout)."""
        res = subprocess.run([sys.executable, "-c", code], env=self.env, cwd=self.home, capture_output=True,
                             text=True, timeout=timeout)
        if ok:
            assert res.returncode == 0, f"failed:\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
        return res

    def client(self, fn):
        from tests.e2e.test_server import client_call

        return client_call(self.url, fn)


@pytest.fixture(scope="session")
def scale_stack(tmp_path_factory):
    from tests.e2e.test_server import checkout

    work = tmp_path_factory.mktemp("scale")
    home = checkout(work)
    sections = work / "sections"
    sections.mkdir()
    with stack.pg_server(work / "server") as (url, env):
        env = {**env, "TOURGUIDE_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PYTHONPATH": f"{SITE}:{ROOT}",
               "TOURGUIDE_CACHE": str(work / "cache"), "TOURGUIDE_TEST_SECTIONS": str(sections),
               "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               # every process of the stack (workers, parents run from tests) heartbeats every 30 s, the
               # minimum Prefect allows, so the zombie window can be short
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "TOURGUIDE_ZOMBIE_SECONDS": "60"}
        s = Stack(url, env, home, work, sections)
        s.sh("bash", "deployments/setup_pools.sh", "1")
        s.sh(PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        with stack.workers(env, work, n_gpu=2, n_cpu=1, heartbeat=30, cwd=home) as procs:
            s.workers = procs
            yield s
