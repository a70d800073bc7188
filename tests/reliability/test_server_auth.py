"""Basic auth on a shared Prefect server: PREFECT_SERVER_API_AUTH_STRING on the server, the same
`user:password` as PREFECT_API_AUTH_STRING on every client (README, "Security").

The server is `prefect server start --host 127.0.0.1 --port <free>` with its own PREFECT_HOME
(tests/reliability/conftest.py); it is stopped when the session ends.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.store.corpus import load_texts
from tests.reliability.conftest import http_status
from tests.reliability.helpers import ROOT, subprocess_env, tree_diff, tree_state


@pytest.mark.slow
def test_unauthenticated_clients_are_refused_and_authenticated_ones_served(prefect_server, make_tiny, tmp_path):
    api = prefect_server.url
    body = b"{}"
    assert http_status(api + "/flows/filter", data=body) == 401, "an anonymous request was served"
    user = prefect_server.auth.split(":")[0]
    assert http_status(api + "/flows/filter", auth=f"{user}:wrong-password", data=body) == 401
    assert http_status(api + "/flows/filter", auth=prefect_server.auth + "x", data=body) == 401
    assert http_status(api + "/flows/filter", auth=prefect_server.auth, data=body) == 200
    # Prefect leaves the health probe open (for load balancers); it reveals nothing.
    assert http_status(api + "/health") == 200

    acts = tmp_path / "acts"
    run_capture(CaptureSpec(model=str(make_tiny("qwen3"))), load_texts(limit=2), acts)
    cmd = [sys.executable, "-m", "flows", "validate", str(acts)]  # with PREFECT_API_URL set: a flow run

    before = tree_state(tmp_path)
    anon = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**prefect_server.client_env(authenticated=False)),
                          capture_output=True, text=True, timeout=180)
    assert anon.returncode != 0 and "401 Unauthorized" in anon.stderr, anon.stderr[-2000:]
    assert tree_diff(before, tree_state(tmp_path)) == []

    ok = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**prefect_server.client_env()), capture_output=True,
                        text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "2 shard(s), 0 bad" in ok.stdout
