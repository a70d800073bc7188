"""Fixtures of the reliability tests: one real Prefect server with basic auth for the session.

The server (`prefect server start --host 127.0.0.1`, its own PREFECT_HOME, SQLite) is started
only when a test asks for `prefect_server`: the auth test, and the tests that run capture flows
in subprocesses (a shared server spares each subprocess its ~15 s throwaway API).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import free_port
from tests.reliability.helpers import ROOT, subprocess_env


@dataclass(frozen=True)
class PrefectServer:
    url: str  # http://127.0.0.1:<port>/api
    auth: str  # user:password, as PREFECT_SERVER_API_AUTH_STRING / PREFECT_API_AUTH_STRING
    home: Path
    log: Path

    def client_env(self, authenticated: bool = True) -> dict[str, str]:
        """Extra env for a subprocess that talks to this server."""
        env = {"PREFECT_API_URL": self.url}
        if authenticated:
            env["PREFECT_API_AUTH_STRING"] = self.auth
        return env


def http_status(url: str, auth: str | None = None, data: bytes | None = None) -> int:
    import base64

    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    auth = f"tourguide:{secrets.token_hex(12)}"
    log = home / "server.log"
    env = subprocess_env(PREFECT_HOME=str(home / "home"), PREFECT_SERVER_API_AUTH_STRING=auth,
                         PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                         PREFECT_LOGGING_LEVEL="WARNING")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = PrefectServer(f"http://127.0.0.1:{port}/api", auth, home, log)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(server.url + "/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _healthy(url: str) -> bool:
    try:
        return http_status(url) == 200
    except OSError:  # connection refused while the server starts
        return False


def api_post(server: PrefectServer, path: str, body: dict) -> list | dict:
    """POST a JSON body to the server's REST API with basic auth; the decoded JSON reply."""
    import base64
    import json

    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(server.auth.encode()).decode()})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())
