"""Where the report's tokenizer and commits come from (the checkpoints, unless the scaffold flags
gave them), the report's figures embedded as data URIs for Prefect's UI, and the run's link to
the demo teacher. Oracles: hashlib over the files, base64 round trips, PIL."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lib.core.errors import BadInputError
from lib.models.loading import resolve_model
from lib.models.provenance import TOKENIZER_FILES, describe_checkpoint
from lib.qa.eval_config import EvalConfig
from lib.qa.provenance import QA_MODELS_NAME, checkpoint_rows, provenance_rows, read_models, record_models, short_revision
from lib.qa.report import embed_figures, render_report
from lib.store.staging import link_folder
from tests.lib.test_report import LAYERS, make_run, md_section, md_table, night_rows


def test_describe_checkpoint_revision_and_tokenizer(make_tiny, tmp_path):
    a, b = make_tiny("qwen3"), make_tiny("qwen3", seed=1)  # same tokenizer, other weights
    da, db = describe_checkpoint(str(a)), describe_checkpoint(str(b))
    assert da["revision"] == resolve_model(str(a)).revision and da["revision"] != db["revision"]
    assert da["tokenizer"]["name"] == str(a)
    # the version is a digest of the tokenizer files only (hashlib as the oracle)
    files = [n for n in TOKENIZER_FILES if (a / n).is_file()]
    assert "tokenizer.json" in files
    want = hashlib.sha256(json.dumps([[n, hashlib.sha256((a / n).read_bytes()).hexdigest()] for n in files],
                                     sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert da["tokenizer"]["version"] == f"sha256:{want}" == db["tokenizer"]["version"]
    # a changed tokenizer file changes the version (negative control)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "tokenizer_config.json").write_text((a / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    assert describe_checkpoint(str(c))["tokenizer"]["version"] != da["tokenizer"]["version"]


def test_report_fields_from_checkpoints_unless_flags_gave_them(make_tiny, tmp_path):
    teacher, student = make_tiny("llama"), make_tiny("llama", seed=2)
    run = make_run(tmp_path)
    cfg = EvalConfig(run_id="r1", runs_root=str(tmp_path / "runs"), teacher={"path": str(teacher)},
                     variants=[{"name": "student-a", "path": str(student)},
                               {"name": "student-b", "path": str(student)},
                               {"name": "gone", "path": str(tmp_path / "no-such-model")}])
    record_models(run, "2026-11-25", cfg)
    models = read_models(run)
    assert models["night"] == "2026-11-25" and models["teacher"]["revision"] == resolve_model(str(teacher)).revision
    assert [v["name"] for v in models["variants"]] == ["student-a", "student-b", "gone"]
    assert "not found" in models["variants"][2]["error"] and models["variants"][2]["revision"] is None

    rows, note = provenance_rows({"tokenizer": {"name": None, "version": None}}, models)
    fields = dict(rows)
    t_rev, s_rev = models["teacher"]["revision"], models["variants"][0]["revision"]
    assert fields["teacher commit"] == short_revision(t_rev) == "sha256:" + t_rev.split(":")[1][:12]
    assert fields["student commit"] == short_revision(s_rev)
    assert fields["tokenizer"] == f"{teacher} @ {short_revision(models['teacher']['tokenizer']['version'])}"
    assert "QA night 2026-11-25" in note and QA_MODELS_NAME in note
    flags = {"tokenizer": {"name": "Qwen/Qwen3-0.6B", "version": "v1"}, "teacher_commit": "abc", "student_commit": "def"}
    rows, note = provenance_rows(flags, models)
    assert dict(rows) == {"tokenizer": "Qwen/Qwen3-0.6B v1", "teacher commit": "abc", "student commit": "def"}
    assert note is None
    assert dict(provenance_rows({}, None)[0]) == {"tokenizer": "—", "teacher commit": "—", "student commit": "—"}

    # the report shows them (and every model of the night) once a QA night recorded them
    append_rows_night(run)
    md = Path(render_report(tmp_path / "runs", "r1").report_path).read_text()
    head = dict((r[0], r[1]) for r in md_table(md_section(md, "# QA report")))
    assert head["teacher commit"] == short_revision(t_rev) and head["tokenizer"].startswith(str(teacher))
    ckpt = md_table(md_section(md, "## Checkpoints"))
    assert [r[0] for r in ckpt] == ["teacher", "student-a", "student-b", "gone"]
    assert ckpt[1][1] == short_revision(s_rev) and ckpt[3][1].startswith("unresolved")
    assert checkpoint_rows(None) == []


def append_rows_night(run: Path) -> None:
    from lib.store.ledgers import append_rows, ledger_path

    append_rows(ledger_path(run, "metrics"), "metrics", night_rows(run, "2026-11-25", "2026-11-25T02:00:00+00:00", 0.0))


def test_embed_figures_inlines_the_pngs(tmp_path):
    run = make_run(tmp_path)
    append_rows_night(run)
    res = render_report(tmp_path / "runs", "r1")
    md = Path(res.report_path).read_text()
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(links) == len(res.figures) == 3  # on disk, report.md keeps linking the files
    out = embed_figures(md, run)
    uris = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", out)
    assert len(uris) == 3 and "](figures/" not in out
    for link, b64 in zip(links, uris, strict=True):
        data = base64.b64decode(b64)
        assert data == (run / link).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.width > 300
    # a figure file that is gone keeps its link (negative control: nothing is invented)
    (run / links[0]).unlink()
    kept = embed_figures(md, run)
    assert f"]({links[0]})" in kept and kept.count("data:image/png") == 2


def test_per_layer_tables_stay_narrow(tmp_path):
    run = make_run(tmp_path)
    variants = tuple(f"v{i}" for i in range(9))
    from lib.store.ledgers import append_rows, ledger_path

    append_rows(ledger_path(run, "metrics"), "metrics",
                night_rows(run, "n1", "2026-11-25T02:00:00+00:00", 0.0, variants=variants))
    md = Path(render_report(tmp_path / "runs", "r1").report_path).read_text()
    section = md_section(md, "### hidden_state_cosine")
    headers = [ln for ln in section.splitlines() if ln.startswith("| layer")]
    assert len(headers) == 3  # 9 variants in tables of at most 4
    cols = [[c.strip() for c in h.strip("|").split("|")][1:] for h in headers]
    assert [v for c in cols for v in c] == list(variants) and max(len(c) for c in cols) == 4
    assert all(len([c for c in ln.strip("|").split("|")]) <= 7 for ln in md.splitlines() if ln.startswith("|"))
    assert LAYERS[0] in section


def test_link_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "config.json").write_text("{}")
    link = tmp_path / "run" / "checkpoints" / "teacher"
    assert link_folder(a, link) == link and link.is_symlink() and (link / "config.json").is_file()
    assert link_folder(a, link) == link  # idempotent
    link_folder(b, link)  # re-pointed (the teacher of another recipe)
    assert link.resolve() == b.resolve() and not list(link.parent.glob(".tmp-link-*"))
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep").write_text("x")
    with pytest.raises(BadInputError, match="not a link"):
        link_folder(a, real)
    assert (real / "keep").read_text() == "x"
