"""The fold flow and `tourguide fold`: validate → write → gate as Prefect tasks, report + ledger +
artifact, a failing gate fails the flow and marks the output, bad input fails before Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as tourguide
from lib.core.errors import GateFailedError
from lib.fold.checkpoint import FAILED_MARKER
from lib.fold.options import FoldOptions
from lib.fold.spec import write_transform_spec
from lib.store.ledgers import read_ledger
from lib.testing.random_transforms import random_head_permutation, random_rotation
from tests.fold_bugs import inject_fold_bug


def make_run(tmp_path: Path, model_dir: Path, **arrays) -> tuple[Path, Path]:
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    spec = write_transform_spec(run, cfg, **arrays)
    return run, spec


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        tourguide(["fold", *args])
    return exit_.value.code


def test_bad_spec_fails_fast_without_prefect_and_writes_nothing(make_tiny, tmp_path, capsys):
    model_dir = make_tiny("qwen3")
    run, spec = make_run(tmp_path, model_dir, head_permutations={0: np.array([0, 2, 1, 3])})
    before = sorted(run.rglob("*"))
    code = cli("--checkpoint", str(model_dir), "--output-dir", str(run / "checkpoints" / "x"), "--spec", str(spec))
    err = capsys.readouterr().err
    assert code == 2 and "tourguide fold: error:" in err and "breaks the GQA groups" in err and "--allow-inexact" in err
    assert sorted(run.rglob("*")) == before
    code = cli("--checkpoint", str(model_dir), "--output-dir", str(model_dir), "--spec", str(spec), "--allow-inexact")
    assert code == 2 and "never overwrites its source" in capsys.readouterr().err


def test_fold_command_runs_the_flow(prefect_harness, make_tiny, tmp_path, capsys):
    model_dir = make_tiny("qwen2", tie=True)
    run, spec = make_run(tmp_path, model_dir, residual_rotation=random_rotation(128, 4),
                         head_permutations={1: random_head_permutation(4, 2, 1)},
                         neuron_permutations={0: np.random.default_rng(0).permutation(256)})
    out = run / "checkpoints" / "rotated"
    code = cli("--checkpoint", str(model_dir), "--output-dir", str(out), "--spec", str(spec), "--probe-texts", "3",
               "--max-shard-size", "600KB")
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "PASSED" in printed and "mean KL" in printed and f"folded checkpoint: {out.resolve()} (passed)" in printed
    report = json.loads((out / "fold_report.json").read_text())
    assert report["status"] == "passed" and report["gate"]["mean_kl"] <= 1e-9 and report["fold"]["untied"]
    assert len(report["fold"]["shards"]) > 1 and report["source"] == str(model_dir)
    ledger = read_ledger(run / "ledgers" / "fold", "fold")
    assert list(ledger["status"]) == ["passed"] and ledger.loc[0, "spec"] == str(spec)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert any(a.type == "markdown" and "Fold gate" in (a.data or "") and str(out) in a.data for a in artifacts)


def test_failing_gate_fails_the_flow_and_marks_the_output(prefect_harness, make_tiny, tmp_path, monkeypatch):
    from flows.fold import fold_flow

    model_dir = make_tiny("llama")
    run, spec = make_run(tmp_path, model_dir, residual_rotation=random_rotation(128, 2))
    out = run / "checkpoints" / "bad"
    # Negative control, injected by the test (no option can do it): the "rotation without gain fold" bug.
    inject_fold_bug(monkeypatch, "no_gain_fold")
    with pytest.raises(GateFailedError, match="does not reproduce"):
        fold_flow(checkpoint=str(model_dir), output_dir=str(out), spec=str(spec),
                  options=FoldOptions(), gate_options={"n_texts": 3})
    assert (out / FAILED_MARKER).exists()
    assert json.loads((out / "fold_report.json").read_text())["status"] == "failed"
    ledger = read_ledger(run / "ledgers" / "fold", "fold")
    assert list(ledger["status"]) == ["failed"] and ledger.loc[0, "mean_kl"] >= 1e-4


@pytest.mark.parametrize("param, value, needle", [
    ("options", {"overwrit": True}, r"fold_flow options: overwrit: unknown key \(did you mean 'overwrite'\?\)"),
    ("options", {"fold_gains": False}, r"fold_flow options: fold_gains: unknown key"),  # no bug switch survives
    ("gate_options", {"n_text": 3}, r"fold_flow gate_options: n_text: unknown key \(did you mean 'n_texts'\?\)"),
    ("options", {"max_shard_bytes": "2GB"}, r"fold_flow options: max_shard_bytes: must be an integer"),
])
def test_a_typo_in_a_deployment_parameter_fails_the_flow(prefect_harness, make_tiny, tmp_path, param, value, needle):
    """Hole 3: the fold options used to drop unknown keys, so `{"overwrit": true}` folded with
    overwrite off. Now the flow fails at its first line with a BadInputError naming the key,
    before any task runs or writes."""
    from flows.fold import fold_flow
    from lib.core.errors import BadInputError

    model_dir = make_tiny("llama")
    run, spec = make_run(tmp_path, model_dir, residual_rotation=random_rotation(128, 2))
    out = run / "checkpoints" / "typo"
    with pytest.raises(BadInputError, match=needle):
        fold_flow(checkpoint=str(model_dir), output_dir=str(out), spec=str(spec), **{param: value})
    assert not out.exists() and not (run / "ledgers" / "fold").exists()


def test_fold_flow_parameters_render_as_forms():
    """The deployment parameters are the typed models: the UI draws forms, refuses unknown keys."""
    from flows.fold import fold_flow

    schema = fold_flow.parameters.model_dump()
    defs = schema["definitions"]
    for param, model in (("options", "FoldOptions"), ("gate_options", "GateOptions")):
        assert any(ref.get("$ref", "").endswith(f"/{model}") for ref in schema["properties"][param]["anyOf"])
        assert defs[model]["additionalProperties"] is False
        assert all(p.get("description") for p in defs[model]["properties"].values())
