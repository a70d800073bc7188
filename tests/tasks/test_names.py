"""Run names and artifact keys (tasks/names.py): the run read from output paths, keys that
Prefect accepts (its own validator is the oracle), the nightly date in the schedule's timezone,
and names read back from real flow runs (Prefect test harness)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from types import SimpleNamespace
from uuid import uuid4

import pytest

import tasks.names as names
from tasks.names import (
    artifact_key,
    capture_name,
    fold_name,
    path_key,
    place_in_run,
    qa_name,
    rotate_name,
    safe_name,
    slug,
)


@pytest.mark.parametrize(("path", "want"), [
    ("runs/demo/activations/transport-student", ("demo", "student")),
    ("runs/demo/activations/qa/student-baseline", ("demo", "qa-student-baseline")),
    ("/abs/runs/x.y/activations/qa/teacher/metadata.jsonl", ("x.y", "qa-teacher")),
    ("runs/demo/checkpoints/student-folded", ("demo", "student-folded")),
    ("runs/demo/checkpoints/model.v2", ("demo", "model.v2")),  # a dotted folder is not a file
    ("runs/demo/rotations", ("demo", "")),
    ("runs/demo/rotations/global.safetensors", ("demo", "")),
    ("/tmp/acts", (None, "acts")),
    (None, (None, "")),
])
def test_place_in_run(path, want):
    assert place_in_run(path) == want


def test_run_names():
    assert capture_name("runs/demo/activations/transport-teacher", "/cache/demo-teacher-1a2b") == "capture-demo-teacher"
    assert capture_name("runs/demo/activations/qa/student-folded", "x") == "capture-demo-qa-student-folded"
    assert capture_name("/tmp/acts", "Qwen/Qwen3-0.6B") == "capture-Qwen3-0.6B"  # outside a run: the model
    assert fold_name("runs/demo/checkpoints/student-folded", "demo-student") == "fold-demo-student-folded"
    assert fold_name("/tmp/out", "mine") == "fold-mine" and fold_name("/tmp/out") == "fold-out"
    assert rotate_name("runs/demo/rotations", "demo-rotate") == "rotate-demo"
    assert rotate_name("rot", "r1") == "rotate-r1" and rotate_name("rot") == "rotate"


def test_qa_name_reads_the_run_id_from_the_config(tmp_path):
    cfg = tmp_path / "eval.json"
    cfg.write_text(json.dumps({"run_id": "nightly-x"}))
    assert qa_name(str(cfg)) == "qa-nightly-x" and qa_name(str(cfg), "n1") == "qa-nightly-x-n1"
    (tmp_path / "bad.json").write_text("{not json")
    assert qa_name(str(tmp_path / "bad.json")) == "qa-bad"  # the flow reports the bad config, not its name
    assert qa_name(str(tmp_path / "missing.toml")) == "qa-missing"


def test_artifact_keys_pass_prefects_own_check():
    from prefect.client.schemas.actions import ArtifactCreate

    keys = [artifact_key("qa-report", "Run_1.x"), artifact_key("checksums", None, "--weird--"),
            path_key("checksums", "runs/demo/activations/qa/teacher/metadata.jsonl", "t"),
            path_key("capture-progress", "/tmp/acts", "Qwen3-0.6B"), artifact_key("x", "A" * 300), slug("---")]
    assert keys[:4] == ["qa-report-run-1-x", "checksums-weird", "checksums-demo-qa-teacher",
                        "capture-progress-qwen3-0-6b-acts"]
    for key in keys:
        ArtifactCreate(key=key, type="markdown", data="x")  # raises for a key Prefect refuses
        assert key and not key.startswith("-") and not key.endswith("-") and len(key) <= 100
    with pytest.raises(Exception, match="lowercase"):  # the negative control: the validator does refuse
        ArtifactCreate(key="Bad_Key", type="markdown", data="x")


def test_safe_name_never_raises():
    assert safe_name(lambda: 1 / 0, "fallback") == "fallback"
    assert safe_name(lambda: "", "fallback") == "fallback"
    assert safe_name(lambda: "ok", "fallback") == "ok"


class FakeClient:
    def __init__(self, deployment_id, schedules, name="nightly"):
        self.run = SimpleNamespace(deployment_id=deployment_id, expected_start_time=None)
        self.dep = SimpleNamespace(name=name, schedules=schedules)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_run(self, _id):
        return self.run

    def read_deployment(self, _id):
        return self.dep


def cron(tz):
    return SimpleNamespace(schedule=SimpleNamespace(cron="0 2 * * *", timezone=tz))


@pytest.mark.parametrize(("when", "tz", "want"), [
    (datetime(2026, 7, 15, 23, 30, tzinfo=timezone.utc), "Europe/London", "nightly-2026-07-16"),  # BST: next day
    (datetime(2026, 1, 15, 23, 30, tzinfo=timezone.utc), "Europe/London", "nightly-2026-01-15"),  # GMT: same day
    (datetime(2026, 1, 15, 23, 30, tzinfo=timezone.utc), None, "nightly-2026-01-15"),  # no timezone: UTC
])
def test_scheduled_name_uses_the_schedules_timezone(monkeypatch, when, tz, want):
    import prefect.client.orchestration as orch

    monkeypatch.setattr(orch, "get_client", lambda **kw: FakeClient(uuid4(), [cron(tz)]))
    assert names.scheduled_name(uuid4(), when) == want


def test_scheduled_name_only_for_scheduled_deployment_runs(monkeypatch):
    import prefect.client.orchestration as orch

    when = datetime(2026, 1, 15, 2, tzinfo=timezone.utc)
    monkeypatch.setattr(orch, "get_client", lambda **kw: FakeClient(None, [cron("UTC")]))
    assert names.scheduled_name(uuid4(), when) is None  # not from a deployment (or a subflow of one)
    monkeypatch.setattr(orch, "get_client", lambda **kw: FakeClient(uuid4(), []))
    assert names.scheduled_name(uuid4(), when) is None  # a deployment without a schedule


def test_names_of_real_runs_read_back(prefect_harness, tmp_path):
    """The flows' own name callables, evaluated by Prefect, read back through the client."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(flow_run_name=names.capture_run_name)
    def fake_capture(model: str, output_dir: str) -> None:
        pass

    @flow(flow_run_name=names.qa_run_name)
    def fake_qa(config: str, night: str | None = None) -> None:
        pass

    cfg = tmp_path / "eval.json"
    cfg.write_text(json.dumps({"run_id": "r7"}))
    states = [fake_capture(model="m", output_dir="runs/r7/activations/transport-student", return_state=True),
              fake_qa(config=str(cfg), return_state=True)]
    with get_client(sync_client=True) as client:
        got = [client.read_flow_run(s.state_details.flow_run_id).name for s in states]
    assert got == ["capture-r7-student", "qa-r7"]


def test_rotation_artifact_is_a_narrow_table():
    """The rotate flow's artifact: every layer's cosines as a markdown table of at most 8 columns
    (the text table is ~140 characters: Prefect's UI cuts a code block to its column)."""
    from lib.transport.record import format_rotation_table
    from tasks.rotate import rotation_markdown

    rows = [dict(layer=f"model.layers.{i}", kind="procrustes", n_tokens=10, d_student=8, d_teacher=8,
                 cosine_before=0.1 * i, cosine_after=0.99, cosine_global=0.98, fit_residual=0.1,
                 fit_residual_global=0.25, dist_to_global=0.3, top_singular_values=[1.0],
                 permutations={"heads_mean_similarity": 0.9, "mlp_mean_correlation": 0.8}) for i in range(11)]
    md = rotation_markdown({"run_id": "x", "layers": rows, "table": format_rotation_table(rows) + "\nnote one"})
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table]
    assert len(cells[0]) == 8 and all(len(c) == 8 for c in cells)  # no stray pipe splits a row
    assert [c[0] for c in cells[2:]] == [f"L{i:02d}" for i in range(11)]
    assert [float(c[1]) for c in cells[2:]] == pytest.approx([0.1 * i for i in range(11)], abs=5e-5)
    assert "- note one" in md and "```" not in md
