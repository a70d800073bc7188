"""The `tourguide` command line: help, quick commands and fail-fast bad input (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.store.corpus import Sample
from lib.store.shards import shard_name

ROOT = Path(__file__).resolve().parents[2]


def tourguide(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_help_lists_every_command():
    res = tourguide("--help")
    assert res.returncode == 0
    for cmd in ["capture", "validate", "analyze", "rotate", "fold", "scaffold", "qa", "report", "demo", "pipeline"]:
        assert cmd in res.stdout
    cap = tourguide("capture", "--help")
    assert "--no-logits" in cap.stdout and "--max-length" in cap.stdout and "--hf-hub-cache" in cap.stdout


# One flag (or phrase) only each command's own parser has: a placeholder parser has none of them.
OWN_FLAG = {"capture": "--no-logits", "validate": "--quiet", "analyze": "legacy .pt", "rotate": "--solve-permutations",
            "fold": "--allow-inexact", "scaffold": "--prompts-dir", "qa": "--config", "report": "--run-id",
            "demo": "--noise", "pipeline": "--pca-dim", "server": "--timeout"}


def test_every_command_has_its_own_parser():
    """Each command in the CLI's list is a real module with its own parser (there is no fallback
    that would register a stand-in under a missing command's name)."""
    import argparse

    from flows.cli import COMMANDS, build_parser

    assert sorted(COMMANDS) == sorted(OWN_FLAG)
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in COMMANDS:
        help_text = subs[name].format_help()
        assert OWN_FLAG[name] in help_text, f"`tourguide {name} --help` lacks {OWN_FLAG[name]!r}"
        assert subs[name].get_default("func").__module__ == f"flows.commands.{name}"


@pytest.fixture(scope="module")
def captured(make_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "acts"
    texts = ["Bondi Beach at dawn.", "外滩的万国建筑群。", "Machu Picchu above the clouds."]
    run_capture(CaptureSpec(model=str(make_tiny("qwen3"))), [Sample(i, f"t{i}", t) for i, t in enumerate(texts)], out)
    return out


def test_validate_and_analyze(captured, tmp_path):
    ok = tourguide("validate", str(captured / "metadata.jsonl"))
    assert ok.returncode == 0, ok.stderr
    assert "3 shard(s), 0 bad" in ok.stdout
    ana = tourguide("analyze", str(captured))
    assert ana.returncode == 0 and "model.layers.1" in ana.stdout and "max|x|" in ana.stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in captured.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    victim = bad / shard_name(1)
    victim.write_bytes(victim.read_bytes()[:-10])
    res = tourguide("validate", str(bad))
    assert res.returncode == 1
    assert shard_name(1) in res.stdout and "BAD" in res.stdout and "3 shard(s), 1 bad" in res.stdout


def test_analyze_reads_legacy_pt_with_weights_only(tmp_path):
    import torch

    torch.save({"model.layers.0": torch.ones(4, 8) * 2}, tmp_path / "legacy.pt")
    res = tourguide("analyze", str(tmp_path / "legacy.pt"))
    assert res.returncode == 0 and "model.layers.0" in res.stdout
    from lib.store.analysis import summarize_activation_file

    (row,) = summarize_activation_file(tmp_path / "legacy.pt")
    assert row.max_abs == 2.0 and row.n_tokens == 4 and row.width == 8


@pytest.mark.parametrize("args, needle", [
    (["--text", ""], "--text #1 is empty"),
    (["--max-length", "0", "--text", "hi"], "--max-length must be >= 1"),
    (["--layer", "model.layers.99", "--text", "hi"], "model.layers.99"),
    (["--text-file", "/nonexistent/texts.txt"], "text file not found"),
])
def test_capture_bad_input_fails_fast_and_writes_nothing(make_tiny, tmp_path, args, needle):
    out = tmp_path / "out"
    res = tourguide("capture", "--model", str(make_tiny("qwen3")), "--output-dir", str(out), *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_capture_hub_id_offline_names_id_and_cache(tmp_path):
    res = tourguide("capture", "--model", "Qwen/Qwen3-0.6B", "--hf-hub-cache", str(tmp_path / "hub"),
                    "--output-dir", str(tmp_path / "out"), "--text", "hi")
    assert res.returncode == 2
    assert "Qwen/Qwen3-0.6B" in res.stderr and str(tmp_path / "hub") in res.stderr
    assert not (tmp_path / "out").exists()
