"""The persistent local Prefect server behind `tourguide server start|stop|status`.

Prefect-free on purpose (lib never imports prefect): the server is a child process
(`prefect server start --host 127.0.0.1 --port P`) in its own session, and its pid, port and log
live under the Prefect home (PREFECT_HOME, default ~/.prefect) as `tourguide-server.json` and
`tourguide-server.log`. Later commands read that file to point PREFECT_API_URL at the server
(`connect`), so they skip the ~15-30 s throwaway API each process would otherwise start.

The database is whatever the server's environment says: SQLite under the Prefect home by default,
PostgreSQL when PREFECT_API_DATABASE_CONNECTION_URL is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from lib.core.errors import BadInputError, TourGuideError
from lib.store.atomic import write_text_atomic

STATE_FILE = "tourguide-server.json"
LOG_FILE = "tourguide-server.log"
HOST = "127.0.0.1"  # loopback only: the API has no authentication


class ServerError(TourGuideError):
    """The local Prefect server could not be started or stopped."""


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_path(home: Path | None = None) -> Path:
    return (home or prefect_home()) / STATE_FILE


def database_label(home: Path | None = None) -> str:
    """Where the server keeps its state, for humans (a PostgreSQL password is masked)."""
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    if url:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
    return f"sqlite {(home or prefect_home()) / 'prefect.db'}"


def _alive(pid: int) -> bool:
    """True if `pid` is a live (not zombie) process that runs prefect; a pid file can outlive its
    server, and the pid can then belong to someone else."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process now: not our server
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc (not Linux): trust the signal check
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"prefect" in cmdline


def ready(url: str, timeout: float = 2.0) -> bool:
    """GET <api>/ready: 200 once the database and services are up (/health answers earlier)."""
    try:
        # no proxy: an HTTP(S)_PROXY in the environment must not route loopback traffic
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url.rstrip("/") + "/ready", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    path = state_path(home)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "corrupt": True}  # unreadable: handled like a stale file


def status(home: Path | None = None, clean_stale: bool = True) -> dict[str, Any]:
    """{"state": "running" | "not answering" | "stopped" | "stale", ...the state file's fields}.

    "stale": a pid file whose process is gone (removed here when `clean_stale`)."""
    state = read_state(home)
    if state is None:
        return {"state": "stopped"}
    if not _alive(int(state.get("pid", -1))):
        if clean_stale:
            state_path(home).unlink(missing_ok=True)
        return {**state, "state": "stale"}
    return {**state, "state": "running" if ready(state["url"]) else "not answering"}


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR as uvicorn sets it: a port in TIME_WAIT after a stop is free, a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def _prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("prefect")
    if not found:
        raise ServerError("the `prefect` command is not installed next to this Python nor on PATH. "
                          "Fix: install the project (pip install -e .) in this environment.")
    return [found]


def _log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def start(port: int = 4200, timeout: float = 180.0, home: Path | None = None) -> dict[str, Any]:
    """Start the server in the background and wait for /api/ready; idempotent.

    Returns status() plus "already": True when one was running. Raises BadInputError when the
    port is taken by another process, ServerError when the server exits or never gets ready."""
    home = home or prefect_home()
    current = status(home)
    t0 = time.monotonic()
    while current["state"] == "not answering" and time.monotonic() - t0 < timeout:
        time.sleep(0.5)  # another start is still migrating or starting: wait for it, don't start a second
        current = status(home)
    if current["state"] in ("running", "not answering"):
        return {**current, "already": True}
    if port_taken(port):
        raise BadInputError(f"port {port} on {HOST} is already taken by another process, so the Prefect server "
                            f"cannot listen there. Fix: `tourguide server start --port <free port>`, or stop the "
                            f"process that listens on {port}.")
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port),
           # so `prefect deployment run --watch` and `prefect flow-run logs` stream the server's logs
           "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true", "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)  # the server must not talk to another API
    log_path = home / LOG_FILE
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*_prefect_command(), "server", "start", "--host", HOST, "--port", str(port)],
                                env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stop() ends its children too
    state = {"pid": proc.pid, "port": port, "url": url, "log": str(log_path), "database": database_label(home),
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(state_path(home), json.dumps(state, indent=1) + "\n")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code = proc.poll()
        if code is not None:
            state_path(home).unlink(missing_ok=True)
            raise ServerError(f"`prefect server start` exited with code {code} while starting (log {log_path}: "
                              f"{_log_tail(log_path)}). Fix what the log says, then start again.")
        if ready(url):
            return {**state, "state": "running", "already": False, "seconds": round(time.monotonic() - t0, 1)}
        time.sleep(0.3)
    _terminate(proc.pid)
    state_path(home).unlink(missing_ok=True)
    raise ServerError(f"the Prefect server was not ready at {url} after {timeout:.0f} s (log {log_path}). "
                      f"Fix: a loaded machine or a first database migration can take longer: "
                      f"`tourguide server start --timeout 600`.")


def _terminate(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            if not _alive(pid):
                return
            time.sleep(0.2)


def stop(home: Path | None = None) -> dict[str, Any]:
    """Stop the server this home's state file names; idempotent. Returns the status it had."""
    current = status(home, clean_stale=True)
    if current["state"] in ("running", "not answering"):
        _terminate(int(current["pid"]))
        if _alive(int(current["pid"])):
            raise ServerError(f"the Prefect server (pid {current['pid']}) did not stop on SIGTERM nor SIGKILL. "
                              f"Fix: check `ps -p {current['pid']}` and end it by hand.")
        state_path(home).unlink(missing_ok=True)
    return current


def connect(env: dict[str, str] | None = None) -> str | None:
    """Point PREFECT_API_URL (in `env`, default os.environ) at the running server, unless the user
    set it. Returns the API URL in use, or None (no server: Prefect will start a throwaway one)."""
    env = os.environ if env is None else env
    if env.get("PREFECT_API_URL"):
        return env["PREFECT_API_URL"]
    state = read_state()
    if not state or not _alive(int(state.get("pid", -1))) or not ready(state["url"]):
        return None
    env["PREFECT_API_URL"] = state["url"]
    return state["url"]
