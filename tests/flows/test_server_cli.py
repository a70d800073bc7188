"""`tourguide server start|stop|status` against a REAL `prefect server start` (subprocesses, a
temporary PREFECT_HOME, a free loopback port): the lifecycle, a capture that uses the server
without being told (its flow run read back through the client), idempotent start/stop, restart
on the same port, a stale pid file, a taken port, and the throwaway API's one-line failure."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def tourguide(home: Path, *args: str, timeout: float = 400, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false", **extra}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie has an empty command line


def flow_run_names(url: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return [r.name for r in await client.read_flow_runs()]

    with temporary_settings({PREFECT_API_URL: url}):
        return asyncio.run(go())


@pytest.mark.slow
def test_server_lifecycle_and_a_capture_that_uses_it(tmp_path, make_tiny):
    home, port = tmp_path / "prefect-home", free_port()
    state_file = home / "tourguide-server.json"
    res = tourguide(home, "server", "status")
    assert res.returncode == 1 and "no Prefect server running" in res.stdout
    pids = []
    try:
        res = tourguide(home, "server", "start", "--port", str(port))
        assert res.returncode == 0, res.stderr
        state = json.loads(state_file.read_text())
        pids.append(state["pid"])
        assert state["url"] == f"http://127.0.0.1:{port}/api" and alive(state["pid"])
        assert "sqlite" in state["database"] and (home / "tourguide-server.log").exists()
        again = tourguide(home, "server", "start", "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads(state_file.read_text())["pid"] == state["pid"]  # no second server
        res = tourguide(home, "server", "status")
        assert res.returncode == 0 and f"127.0.0.1:{port}" in res.stdout

        cap = tourguide(home, "capture", "--model", str(make_tiny()), "--output-dir", str(tmp_path / "acts"),
                        "--text", "first text", "--text", "second text")
        assert cap.returncode == 0, cap.stderr[-3000:]
        assert "throwaway" not in cap.stderr  # it used the server: no fallback hint
        assert any(name.startswith("capture-") for name in flow_run_names(state["url"]))

        res = tourguide(home, "server", "stop")
        assert res.returncode == 0 and "stopped" in res.stdout
        assert not alive(state["pid"]) and not state_file.exists()
        res = tourguide(home, "server", "stop")
        assert res.returncode == 0 and "no Prefect server was running" in res.stdout
        assert tourguide(home, "server", "status").returncode == 1

        # the port is free again at once (TIME_WAIT is not "taken"), and the database is kept
        res = tourguide(home, "server", "start", "--port", str(port))
        assert res.returncode == 0, res.stderr
        pids.append(json.loads(state_file.read_text())["pid"])
        assert any(name.startswith("capture-") for name in flow_run_names(state["url"]))
        assert tourguide(home, "server", "stop").returncode == 0
        assert not alive(pids[-1])
    finally:
        for pid in pids:  # never leave a server behind, whatever failed above
            if alive(pid):
                os.killpg(pid, 9)


def test_a_stale_pid_file_is_reported_and_removed(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    state_file = home / "tourguide-server.json"
    state_file.write_text(json.dumps({"pid": gone.pid, "port": 1, "url": "http://127.0.0.1:1/api"}))
    res = tourguide(home, "server", "status")
    assert res.returncode == 1 and f"stale pid file (pid {gone.pid} is gone)" in res.stdout
    assert not state_file.exists()
    state_file.write_text(json.dumps({"pid": gone.pid, "port": 1, "url": "http://127.0.0.1:1/api"}))
    res = tourguide(home, "server", "stop")
    assert res.returncode == 0 and "stale pid file" in res.stdout and not state_file.exists()
    # a pid that is alive but is not a prefect server (pid reuse) is stale too
    state_file.write_text(json.dumps({"pid": os.getpid() if b"prefect" not in
                                      Path("/proc/self/cmdline").read_bytes() else 1,
                                      "port": 1, "url": "http://127.0.0.1:1/api"}))
    res = tourguide(home, "server", "stop")
    assert res.returncode == 0 and "stale pid file" in res.stdout


def test_a_taken_port_is_one_clear_line(tmp_path):
    home = tmp_path / "prefect-home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = tourguide(home, "server", "start", "--port", str(port), timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "taken" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in res.stderr and not (home / "tourguide-server.json").exists()


@pytest.mark.slow
def test_the_throwaway_api_failing_to_start_is_one_clear_line(tmp_path, make_tiny):
    """With no server, the command says it starts a throwaway API; when that cannot start (here: the
    user's own 0 s start-up timeout), one line says what to do, with no traceback."""
    res = tourguide(tmp_path / "prefect-home", "capture", "--model", str(make_tiny()), "--output-dir",
                    str(tmp_path / "acts"), "--text", "a text", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert res.returncode == 2
    assert "`tourguide server start` makes later commands faster" in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "throwaway API did not start" in errors[0] and "tourguide server start" in errors[0]
    assert "Traceback" not in res.stderr
