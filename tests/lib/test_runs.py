"""Run scaffolding: snapshot hashes vs hashlib, idempotent re-runs, refusal with a diff, nothing
written on bad input, and the snapshot check the QA flow relies on.

Run: `.venv/bin/python -m pytest tests/lib/test_runs.py -q`
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from flows.cli import main
from lib.core.errors import BadInputError
from lib.store.ledgers import ledger_path, read_ledger
from lib.store.runs import RUN_SUBDIRS, ScaffoldSpec, project_commit, scaffold_run, verify_snapshot
from lib.store.snapshot import blurb_hashes, build_snapshot

EN = ["Bondi Beach curves for a kilometre of pale sand.", "The Louvre's glass pyramid glows at dusk.",
      "Table Mountain is often wrapped in cloud."]
ZH = ["悉尼歌剧院的白色风帆倒映在港湾里。", "长城蜿蜒在群山之间。"]


@pytest.fixture()
def corpus(tmp_path):
    s, p = tmp_path / "samples", tmp_path / "prompts"
    s.mkdir()
    (p / "personas").mkdir(parents=True)
    (s / "en.txt").write_text("\n".join(EN) + "\n", encoding="utf-8")
    (s / "zh.txt").write_text("\n\n".join(ZH) + "\n", encoding="utf-8")  # a blank line: line numbers skip it
    (p / "system.md").write_text("You are a tour guide.\n")
    (p / "personas" / "families.md").write_text("# Families\n- keep it short\n")
    (p / "notes.txt").write_text("not a prompt file")
    return s, p


def spec(tmp_path, corpus, **kw) -> ScaffoldSpec:
    s, p = corpus
    return ScaffoldSpec(**{"run_id": "r1", "runs_root": str(tmp_path / "runs"), "samples_dir": str(s),
                           "prompts_dir": str(p), **kw})


def tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_scaffold_writes_the_layout_and_hashes(tmp_path, corpus):
    s, p = corpus
    out = scaffold_run(spec(tmp_path, corpus, tokenizer_name="tiny-bpe", tokenizer_version="1",
                            teacher_commit="t0", student_commit="s0"))
    run = tmp_path / "runs" / "r1"
    assert out["created"] and out["run_dir"] == str(run)
    for sub in RUN_SUBDIRS:
        assert (run / sub).is_dir()
    assert (run / "rotations.jsonl").read_bytes() == b""
    snap = json.loads((run / "dataset_snapshot.json").read_text())
    man = json.loads((run / "manifest.json").read_text())
    assert [f["file"] for f in snap["samples"]] == ["en.txt", "zh.txt"]
    assert snap["samples"][0]["sha256"] == sha((s / "en.txt").read_bytes())
    assert [b["sha256"] for b in snap["samples"][0]["blurbs"]] == [sha(t.encode()) for t in EN]
    assert [(b["line"], b["sample_id"]) for b in snap["samples"][1]["blurbs"]] == [(1, "zh.txt:1"), (3, "zh.txt:3")]
    assert [(f["file"], f["sha256"]) for f in snap["prompts"]] == [
        ("personas/families.md", sha((p / "personas" / "families.md").read_bytes())),
        ("system.md", sha((p / "system.md").read_bytes()))]
    assert man["run_id"] == "r1" and man["snapshot_digest"] == snap["digest"]
    assert man["tokenizer"] == {"name": "tiny-bpe", "version": "1"}
    assert (man["teacher_commit"], man["student_commit"]) == ("t0", "s0")
    git = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert man["git_commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert man["created_at"].endswith("+00:00") and man["n_blurbs"] == 5
    ds = read_ledger(ledger_path(run, "dataset"), "dataset")
    assert sorted(ds.kind.value_counts().items()) == [("blurb", 5), ("prompt", 2), ("sample_file", 2)]
    assert set(ds[ds.kind == "blurb"].sha256) == {sha(t.encode()) for t in EN + ZH}


def test_rerun_is_a_no_op_and_changed_inputs_are_refused_with_a_diff(tmp_path, corpus):
    s, _ = corpus
    first = scaffold_run(spec(tmp_path, corpus, teacher_commit="t0"))
    run = tmp_path / "runs" / "r1"
    before = tree(run)
    mtimes = {f: (run / f).stat().st_mtime_ns for f in before}
    again = scaffold_run(spec(tmp_path, corpus, teacher_commit="t0"))
    assert not again["created"] and again["created_at"] == first["created_at"]
    assert tree(run) == before and {f: (run / f).stat().st_mtime_ns for f in before} == mtimes
    # a deleted sub-folder is put back, still without touching any file
    (run / "logs").rmdir()
    scaffold_run(spec(tmp_path, corpus, teacher_commit="t0"))
    assert (run / "logs").is_dir() and tree(run) == before

    with pytest.raises(BadInputError, match=r"teacher_commit: 't0' → 't1'") as err:
        scaffold_run(spec(tmp_path, corpus, teacher_commit="t1"))
    assert "pick a new --run-id" in str(err.value)
    (s / "en.txt").write_text("\n".join([EN[0], EN[1] + "!", EN[2]]) + "\n", encoding="utf-8")
    with pytest.raises(BadInputError) as err:
        scaffold_run(spec(tmp_path, corpus, teacher_commit="t0"))
    msg = str(err.value)
    assert "sample file en.txt: sha256" in msg and "blurb en.txt:2:" in msg
    assert "en.txt:1" not in msg and "en.txt:3" not in msg and "zh.txt" not in msg
    assert tree(run) == before, "a refused scaffold wrote something"


def test_one_changed_blurb_changes_only_its_hash(tmp_path, corpus):
    s, p = corpus
    a = build_snapshot(s, p)
    (s / "zh.txt").write_text("\n\n".join([ZH[0], ZH[1].replace("长城", "长城 ")]) + "\n", encoding="utf-8")
    b = build_snapshot(s, p)
    ha, hb = blurb_hashes(a), blurb_hashes(b)
    assert ha.keys() == hb.keys()
    assert [k for k in ha if ha[k] != hb[k]] == ["zh.txt:3"]
    assert a["samples"][0] == b["samples"][0]  # the other file: same file hash and blurbs
    assert a["samples"][1]["sha256"] != b["samples"][1]["sha256"]
    assert a["prompts"] == b["prompts"] and a["digest"] != b["digest"]
    # the digest is content-addressed: the same corpus elsewhere has the same digest
    other = tmp_path / "copy"
    (other / "samples").mkdir(parents=True)
    (other / "prompts" / "personas").mkdir(parents=True)
    for f in s.iterdir():
        (other / "samples" / f.name).write_bytes(f.read_bytes())
    for f in p.rglob("*.md"):
        (other / "prompts" / f.relative_to(p)).write_bytes(f.read_bytes())
    assert build_snapshot(other / "samples", other / "prompts")["digest"] == b["digest"]


def test_prompt_override_and_bad_input_write_nothing(tmp_path, corpus):
    s, p = corpus
    out = scaffold_run(spec(tmp_path, corpus, prompts=("system.md",)))
    assert out["n_prompt_files"] == 1 and out["prompts"] == ["system.md"]
    runs = tmp_path / "runs"
    for bad, needle in [
        (dict(run_id="../up"), "--run-id '../up'"),
        (dict(run_id="r2", samples_dir=str(tmp_path / "nope")), "--samples-dir .*nope: folder not found"),
        (dict(run_id="r2", prompts=("missing.md",)), "--prompt #1 'missing.md': file not found"),
        (dict(run_id="r2", prompts_dir=str(tmp_path / "empty")), "--prompts-dir .*empty: folder not found"),
    ]:
        with pytest.raises(BadInputError, match=needle):
            scaffold_run(spec(tmp_path, corpus, **bad))
    assert sorted(x.name for x in runs.iterdir()) == ["r1"]
    (s / "broken.txt").write_bytes(b"\xff\xfe bad\n")
    with pytest.raises(BadInputError, match="broken.txt: not valid UTF-8"):
        scaffold_run(spec(tmp_path, corpus, run_id="r3"))
    assert not (runs / "r3").exists()


def test_verify_snapshot_catches_corpus_drift(tmp_path, corpus):
    s, p = corpus
    scaffold_run(spec(tmp_path, corpus))
    info = verify_snapshot(tmp_path / "runs", "r1")
    assert [Path(f).name for f in info.sample_files] == ["en.txt", "zh.txt"]
    (p / "personas" / "new.md").write_text("# new persona\n")  # the default list is re-globbed
    with pytest.raises(BadInputError, match="prompt file personas/new.md: added"):
        verify_snapshot(tmp_path / "runs", "r1")
    (p / "personas" / "new.md").unlink()
    (s / "en.txt").write_text("\n".join(EN[:2]) + "\n", encoding="utf-8")
    with pytest.raises(BadInputError, match=r"blurb en.txt:3: [0-9a-f]{12} → absent"):
        verify_snapshot(tmp_path / "runs", "r1")
    with pytest.raises(BadInputError, match="never scaffolded"):
        verify_snapshot(tmp_path / "runs", "other")


def test_project_commit_outside_git_is_unknown(tmp_path):
    assert project_commit(tmp_path) == "unknown"


def test_cli_scaffold_and_report_on_an_empty_run(tmp_path, corpus, capsys):
    s, p = corpus
    argv = ["scaffold", "--run-id", "cli", "--runs-root", str(tmp_path / "runs"), "--samples-dir", str(s),
            "--prompts-dir", str(p), "--tokenizer-name", "tiny"]
    for expect in ("created", "same inputs"):
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 0 and expect in capsys.readouterr().out
    with pytest.raises(SystemExit) as code:
        main(argv[:-1] + ["other"])
    assert code.value.code == 2 and "tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        main(["report", "--run-id", "cli", "--runs-root", str(tmp_path / "runs")])
    assert code.value.code == 0
    report = (tmp_path / "runs" / "cli" / "report.md").read_text()
    assert "No QA metrics are recorded for this run yet" in report
    with pytest.raises(SystemExit) as code:
        main(["report", "--run-id", "ghost", "--runs-root", str(tmp_path / "runs")])
    assert code.value.code == 2 and "tourguide scaffold --run-id ghost" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--mock" in capsys.readouterr().out
