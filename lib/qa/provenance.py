"""Which checkpoints a QA night measured, for the report's tokenizer and commit fields.

`record_models` (called when a QA night starts) resolves the eval config's teacher and variants
(`lib.models.provenance.describe_checkpoint`: hub commit or folder digest, tokenizer name and
version) and writes them to `runs/<id>/qa_models.json`. `provenance_rows` gives the report's
fields: what the scaffold flags recorded in the manifest (--tokenizer-name, --teacher-commit, …)
wins; otherwise the values come from the checkpoints the latest QA night measured, and say so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lib.core.errors import TourGuideError
from lib.models.provenance import describe_checkpoint
from lib.qa.eval_config import EvalConfig
from lib.store.atomic import write_text_atomic

QA_MODELS_NAME = "qa_models.json"


def describe_models(cfg: EvalConfig) -> dict[str, Any]:
    """{"teacher": {...}, "variants": [{...}]}, each `describe_checkpoint` plus "name" and
    "path"; a model that cannot be resolved gets an "error" instead (its capture reports it)."""
    seen: dict[tuple[str, str | None], dict[str, Any]] = {}

    def describe(name: str, path: str, revision: str | None) -> dict[str, Any]:
        key = (path, revision)
        if key not in seen:
            try:
                seen[key] = describe_checkpoint(path, revision, cfg.hf_home, cfg.hf_hub_cache)
            except TourGuideError as exc:
                seen[key] = {"ref": path, "revision": None, "tokenizer": None, "error": str(exc)[:300]}
        return {"name": name, "path": path, **seen[key]}

    return {"teacher": describe(cfg.teacher.name, cfg.teacher.path, cfg.teacher.revision),
            "variants": [describe(v.name, v.path, v.revision) for v in cfg.variants]}


def record_models(run_dir: str | os.PathLike, night: str, cfg: EvalConfig) -> dict[str, Any]:
    """Describe the night's models and write them to runs/<id>/qa_models.json (atomically)."""
    data = {"night": night, **describe_models(cfg)}
    write_text_atomic(Path(run_dir) / QA_MODELS_NAME, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def read_models(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The latest night's models, or None (no QA night yet, or an unreadable file)."""
    try:
        data = json.loads((Path(run_dir) / QA_MODELS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def provenance_rows(manifest: dict[str, Any], models: dict[str, Any] | None) -> tuple[list[list[str]], str | None]:
    """The report's [field, value] rows (tokenizer, teacher commit, student commit; revisions cut
    to 12 hex digits) and a note saying which came from the checkpoints (None: all from flags)."""
    models = models or {}
    teacher = models.get("teacher") or {}
    variants = models.get("variants") or []
    student = variants[0] if variants else {}
    derived: list[str] = []
    tok = manifest.get("tokenizer") or {}
    ttok = teacher.get("tokenizer") or {}
    if tok.get("name") or tok.get("version"):
        tokenizer = " ".join(str(x) for x in (tok.get("name"), tok.get("version")) if x)
    elif ttok.get("name"):
        tokenizer = " @ ".join(x for x in (ttok["name"], short_revision(ttok.get("version"))) if x)
        derived.append("tokenizer (the teacher's)")
    else:
        tokenizer = "—"

    def commit(flag: Any, model: dict[str, Any], what: str) -> str:
        if flag:
            return str(flag)
        if model.get("revision"):
            derived.append(f"{what} ({model.get('name')})")
            return short_revision(model["revision"]) or "—"
        return "—"

    rows = [["tokenizer", tokenizer], ["teacher commit", commit(manifest.get("teacher_commit"), teacher, "teacher commit")],
            ["student commit", commit(manifest.get("student_commit"), student, "student commit")]]
    note = None
    if derived:
        note = (f"From the checkpoints of QA night {models.get('night')} (no scaffold flag gave them): "
                f"{', '.join(derived)}; full revisions in `{QA_MODELS_NAME}`.")
    return rows, note


def short_revision(revision: str | None) -> str | None:
    """A commit or `sha256:` digest cut to 12 hex digits, as git shows commits: narrow tables
    stay narrow (a long unbreakable hash runs out of its cell in Prefect's UI)."""
    if not revision:
        return revision
    prefix, _, tail = revision.rpartition(":")
    return (f"{prefix}:" if prefix else "") + tail[:12]


def checkpoint_rows(models: dict[str, Any] | None) -> list[list[Any]]:
    """[model, short revision, checkpoint] per model of the latest QA night (teacher first);
    the full revisions are in qa_models.json."""
    if not models:
        return []
    out = []
    for m in [models.get("teacher") or {}, *(models.get("variants") or [])]:
        rev = short_revision(m.get("revision")) or f"unresolved: {str(m.get('error', ''))[:120]}"
        out.append([m.get("name"), rev, f"`{m.get('path')}`"])
    return out
