"""The report: numbers in report.md match the ledger (read back independently with pyarrow), the
night-to-night changes, figures are real PNGs with content, and empty runs still report.

Run: `.venv/bin/python -m pytest tests/lib/test_report.py -q`
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lib.qa.report import render_report
from lib.store.ledgers import append_rows, ledger_path
from lib.store.runs import ScaffoldSpec, scaffold_run

LAYERS = [f"model.layers.{i}" for i in (0, 1, 2, 10)]  # 10 sorts after 2, not after 1


def make_run(tmp_path: Path, run_id: str = "r1", text: str = "One blurb.\nTwo blurbs.\n") -> Path:
    s, p = tmp_path / f"samples-{run_id}", tmp_path / f"prompts-{run_id}"
    s.mkdir()
    p.mkdir()
    (s / "en.txt").write_text(text)
    (p / "system.md").write_text("Be brief.\n")
    out = scaffold_run(ScaffoldSpec(run_id=run_id, runs_root=str(tmp_path / "runs"), samples_dir=str(s),
                                    prompts_dir=str(p)))
    return Path(out["run_dir"])


def night_rows(run_dir: Path, night: str, stamp: str, shift: float, variants=("student-a", "student-b")) -> list[dict]:
    digest = json.loads((run_dir / "manifest.json").read_text())["snapshot_digest"]
    common = dict(run_id=run_dir.name, night=night, timestamp=stamp, snapshot_digest=digest, code_version="test")
    rows = [dict(common, variant="teacher", metric="surprisal", value=3.5, n_tokens=40),
            dict(common, variant="teacher", metric="perplexity", value=float(np.exp(3.5)), n_tokens=40)]
    rows += [dict(common, variant="teacher", metric="residual_rms", layer=la, value=1.0 + i, n_tokens=42)
             for i, la in enumerate(LAYERS)]
    for j, v in enumerate(variants):
        base = 0.1 * (j + 1) + shift
        rows += [dict(common, variant=v, metric="logit_kl", value=base, n_tokens=42),
                 dict(common, variant=v, metric="logit_kl", sample="en.txt:1", value=99.0, n_tokens=20),
                 dict(common, variant=v, metric="surprisal", value=3.6 + base, n_tokens=40),
                 dict(common, variant=v, metric="perplexity", value=float(np.exp(3.6 + base)), n_tokens=40)]
        for i, la in enumerate(LAYERS):
            rows += [dict(common, variant=v, metric="hidden_state_cosine", layer=la, value=0.9 - 0.1 * i - base, n_tokens=42),
                     dict(common, variant=v, metric="residual_rms", layer=la, value=(1.0 + i) * (1 + base), n_tokens=42),
                     dict(common, variant=v, metric="residual_rms_ratio", layer=la, value=1 + base, n_tokens=42)]
    return rows


def md_section(md: str, heading: str) -> str:
    start = md.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    ends = [md.find("\n" + "#" * n + " ", start + 1) for n in range(2, level + 1)]
    ends = [e for e in ends if e > 0]
    return md[start: min(ends) if ends else len(md)]


def md_table(section: str) -> list[list[str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def check_png(path: str) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
        px = np.asarray(im.convert("RGB")).astype(float)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50, f"{path}: almost blank"
    assert px.std() > 10


def test_report_numbers_match_the_ledger(tmp_path):
    run = make_run(tmp_path)
    path = ledger_path(run, "metrics")
    append_rows(path, "metrics", night_rows(run, "2026-11-24", "2026-11-24T02:00:00+00:00", 0.0))
    # night 2 ran twice: the later rows replace the earlier ones of the same variant
    append_rows(path, "metrics", night_rows(run, "2026-11-25", "2026-11-25T02:00:00+00:00", 5.0))
    append_rows(path, "metrics", night_rows(run, "2026-11-25", "2026-11-25T03:00:00+00:00", 0.25))
    rot = [{"run_id": "rotate-x", "recorded_at": "2026-11-23T00:00:00+00:00", "layer": la, "kind": "procrustes",
            "n_tokens": 42, "d_student": 8, "d_teacher": 8, "pca_dim": None, "cosine_before": 0.05 * i,
            "cosine_after": 0.9, "cosine_global": 0.85, "fit_residual": 0.1, "dist_to_global": 0.2,
            "excluded_position0": False, "top_singular_values": "[]", "rotation_path": "r", "student_index": "s",
            "teacher_index": "t"} for i, la in enumerate(LAYERS)]
    append_rows(run / "rotations.jsonl", "rotations", rot)

    res = render_report(tmp_path / "runs", "r1")
    md = Path(res.report_path).read_text()
    assert res.latest_night == "2026-11-25" and res.previous_night == "2026-11-24"

    # the oracle: the parquet files themselves, read without lib.report
    df = pq.read_table(path).to_pandas()
    latest = df[(df.night == "2026-11-25") & (df.timestamp == "2026-11-25T03:00:00+00:00") & df["sample"].isna()]
    summary = md_table(md_section(md, "## Summary — night 2026-11-25"))
    header = [c.strip() for c in md_section(md, "## Summary").splitlines()[4].strip("|").split("|")]
    assert [r[0] for r in summary] == ["teacher", "student-a", "student-b"]
    checked = 0
    for row in summary:
        for col, cell in zip(header[1:], row[1:], strict=True):
            metric = col.split(" ")[0]
            sel = latest[(latest.variant == row[0]) & (latest.metric == metric)]
            if sel.empty:
                assert cell == "—"
                continue
            assert float(cell) == pytest.approx(sel.value.mean(), rel=1e-5), (row[0], metric)
            checked += 1
    assert checked == 2 + 2 * 5
    # per-layer tables, in natural layer order
    cos = md_table(md_section(md, "### hidden_state_cosine"))
    assert [r[0] for r in cos] == LAYERS
    for r in cos:
        want = latest[(latest.metric == "hidden_state_cosine") & (latest.layer == r[0])].set_index("variant").value
        assert float(r[1]) == pytest.approx(want["student-a"], rel=1e-5)
        assert float(r[2]) == pytest.approx(want["student-b"], rel=1e-5)
    # what changed: delta of the summary values between the two nights
    changes = {(r[0], r[1]): r for r in md_table(md_section(md, "## What changed since the previous night"))}
    kl = changes[("student-b", "logit_kl")]
    assert float(kl[2]) == pytest.approx(0.2) and float(kl[3]) == pytest.approx(0.45)
    delta, relative = kl[4].split(" ")
    assert float(delta) == pytest.approx(0.25) and relative == "(+125.00%)" and kl[5] == "up"
    assert changes[("teacher", "surprisal")][5] == "unchanged"
    # rotations ledger table and figures
    rot_rows = md_table(md_section(md, "## Rotations"))
    assert [r[0] for r in rot_rows] == LAYERS and float(rot_rows[3][3]) == pytest.approx(0.15)
    assert set(res.figures) == {"trends", "cosine", "rms"}
    for kind, p in res.figures.items():
        check_png(p)
        assert f"](figures/{Path(p).name})" in md
    assert Path(res.figures["trends"]).name == "metric_trends.png"


def test_first_night_failures_and_trends_across_runs(tmp_path):
    run = make_run(tmp_path, "r1")
    append_rows(ledger_path(run, "metrics"), "metrics", night_rows(run, "n1", "2026-11-24T02:00:00+00:00", 0.0,
                                                                   variants=("student-a",)))
    same = make_run(tmp_path, "r0")  # same corpus → comparable; earlier
    append_rows(ledger_path(same, "metrics"), "metrics", night_rows(same, "n0", "2026-11-20T02:00:00+00:00", 0.1,
                                                                    variants=("student-a",)))
    other = make_run(tmp_path, "r2", text="A different corpus.\n")  # another snapshot → not in the trend
    append_rows(ledger_path(other, "metrics"), "metrics", night_rows(other, "n9", "2026-11-26T02:00:00+00:00", 0.3,
                                                                     variants=("student-a",)))
    res = render_report(tmp_path / "runs", "r1", failures=[{"variant": "student-b", "error": "BadInputError: boom\nmore"}])
    md = Path(res.report_path).read_text()
    assert "No previous night in this run's ledger (first night: n1)" in md
    assert "- **student-b**: BadInputError: boom" in md and "more" not in md.split("## Failed")[1].split("##")[0]
    assert "## Rotations" not in md  # the empty rotations.jsonl is no table
    from lib.qa.report import trend_frame

    tf = trend_frame(tmp_path / "runs", "r1", json.loads((run / "manifest.json").read_text())["snapshot_digest"])
    assert list(dict.fromkeys(tf.point)) == ["r0:n0", "r1:n1"]
    check_png(res.figures["trends"])
    assert set(res.figures) == {"trends", "cosine", "rms"}
