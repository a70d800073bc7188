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


def provenance_rows(manifest: dict[str, Any], models: dict[str, Any] | None) -> list[list[str]]:
    """The report's [field, value] rows: tokenizer, teacher commit, student commit."""
    models = models or {}
    teacher = models.get("teacher") or {}
    variants = models.get("variants") or []
    night = models.get("night")

    def from_checkpoint(model: dict[str, Any]) -> str:
        return f" (from the {model.get('name')} checkpoint, QA night {night})"

    tok = manifest.get("tokenizer") or {}
    ttok = teacher.get("tokenizer") or {}
    if tok.get("name") or tok.get("version"):
        tokenizer = " ".join(str(x) for x in (tok.get("name"), tok.get("version")) if x)
    elif ttok.get("name"):
        cls = f", {ttok['class']}" if ttok.get("class") else ""
        tokenizer = f"{ttok['name']} {ttok.get('version') or ''}".strip() + cls + from_checkpoint(teacher)
    else:
        tokenizer = "—"

    def commit(flag: Any, model: dict[str, Any]) -> str:
        if flag:
            return str(flag)
        return f"{model['revision']}{from_checkpoint(model)}" if model.get("revision") else "—"

    return [["tokenizer", tokenizer], ["teacher commit", commit(manifest.get("teacher_commit"), teacher)],
            ["student commit", commit(manifest.get("student_commit"), variants[0] if variants else {})]]


def checkpoint_rows(models: dict[str, Any] | None) -> list[list[Any]]:
    """[model, checkpoint, revision] per model of the latest QA night (teacher first)."""
    if not models:
        return []
    out = []
    for m in [models.get("teacher") or {}, *(models.get("variants") or [])]:
        out.append([m.get("name"), f"`{m.get('path')}`", m.get("revision") or f"unresolved: {m.get('error', '')[:120]}"])
    return out
