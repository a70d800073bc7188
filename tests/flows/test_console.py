"""The quiet console (subprocesses against one real `prefect server start`): the demo prints one
progress line per stage and its summary, no Prefect INFO lines and no HF bars, while the log file
under runs/<id>/logs/ has them; --verbose brings them back; a failing run prints one error line
naming the failed step and the log path, and the flow run's final state carries the message."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import harness

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
            vocab_size=512, steps=25, batch_size=8, max_length=48)
# The real CLI entry point; only the demo teacher's recipe is made tiny (a test-only switch, here).
SMALL_DEMO = f"""
import sys
import flows.demo as demo
parse = demo.DemoRecipe.parse
demo.DemoRecipe.parse = lambda recipe, where=None: parse({{**{TINY!r}, **(recipe or {{}})}}, where)
from flows.cli import main
main(sys.argv[1:])
"""
PREFECT_INFO = " | INFO "  # Prefect's console layout: `12:00:00.000 | INFO    | Task run ...`


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with harness.prefect_server(tmp_path_factory.mktemp("server")) as (url, env):
        yield url, {**env, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}


def run(env: dict, args: list[str], code: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "flows", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_demo_console_is_quiet_and_the_log_file_has_everything(server, tmp_path):
    _, env = server
    env = {**env, "TOURGUIDE_CACHE": str(tmp_path / "cache")}
    res = run(env, ["demo", "--runs-root", str(tmp_path / "runs"), "--run-id", "quiet", "--limit", "16",
                    "--max-length", "32", "--batch-size", "16"], code=SMALL_DEMO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert PREFECT_INFO not in out, out[:3000]
    assert "Loading weights" not in out and "Writing model shards" not in out
    assert "OfflineTourGuide demo — run quiet" in res.stdout  # the summary
    stages = [ln for ln in res.stderr.splitlines() if ln.startswith(("capture ", "rotate ", "fold ", "qa "))]
    for prefix in ("capture ", "rotate ", "fold ", "qa "):
        assert any(ln.startswith(prefix) for ln in stages), res.stderr
    assert all(" in " in ln for ln in stages), stages  # each finished: "N/N unit in Ts"
    assert len(res.stderr.splitlines()) <= len(stages) + 3, res.stderr  # nothing else but a hint or warning
    log = tmp_path / "runs" / "quiet" / "logs" / "demo.log"
    text = log.read_text()
    assert "Finished in state Completed" in text and "Flow run 'capture-quiet-student'" in text
    assert "Task run 'capture-" in text


@pytest.mark.slow
def test_verbose_brings_prefect_lines_back(server, tmp_path, make_tiny):
    """The quiet default (the negative control) is the demo test above, in the same set-up."""
    _, env = server
    loud = run(env, ["capture", "--model", str(make_tiny()), "--text", "one text", "--text", "another text",
                     "--output-dir", str(tmp_path / "loud"), "--verbose"])
    assert loud.returncode == 0, loud.stderr
    assert PREFECT_INFO in loud.stderr and "Finished in state Completed" in loud.stderr
    assert "Loading weights" in loud.stderr  # the HF bars come back too
    assert (tmp_path / "logs" / "capture-loud.log").read_text().count("Finished in state Completed") >= 3


@pytest.mark.slow
def test_a_failure_is_one_line_naming_the_step_and_the_log(server, tmp_path, make_tiny):
    url, env = server
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(make_tiny()).iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    res = run(env, ["capture", "--model", str(broken), "--output-dir", str(tmp_path / "acts"), "--text", "a text"])
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    log = tmp_path / "logs" / "capture-acts.log"
    assert len(errors) == 1, res.stderr
    assert "model could not be loaded" in errors[0] and "failed step: capture-broken-s0000" in errors[0]
    assert f"log: {log}" in errors[0] and "Traceback" not in res.stderr
    assert "Traceback" in log.read_text() and "ModelLoadError" in log.read_text()

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def states():
        async with get_client() as client:
            return [(r.name, r.state.message or "") for r in await client.read_flow_runs()]

    with temporary_settings({PREFECT_API_URL: url}):
        failed = [m for name, m in asyncio.run(states()) if name.startswith("capture-broken")]
    assert failed and "model could not be loaded" in failed[0]  # the UI and --watch show why

