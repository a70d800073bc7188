"""A real `prefect server start` for end-to-end tests and the UI check: a free loopback port, its
own PREFECT_HOME, the UI on or off, stopped (process group) when the block ends.

The server's env carries PREFECT_SERVER_API_HOST/PORT, so the UI's /ui-settings point at this
port (with `--port` alone the UI calls :4200), and streams logs to `prefect … --watch`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 180) -> None:
    """Poll GET /api/ready (the database is reachable too; /api/health is not enough) until it
    answers 200; raise with the end of the server's log if it exits or times out."""
    tail = (lambda: ":\n" + log.read_text()[-3000:]) if log is not None else (lambda: "")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early with code {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not ready at {url} after {timeout}s{tail()}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def prefect_server(workdir: Path, ui: bool = False) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (api url, env for clients: PREFECT_HOME + PREFECT_API_URL) of a fresh server."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true" if ui else "false", "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
           "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_ready(url, proc, timeout=120)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        stop(proc)
        log.close()
