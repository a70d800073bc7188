"""Run folders: scaffold `runs/<run_id>/` over a hashed, frozen snapshot of the corpus.

    tourguide scaffold --run-id nightly --runs-root runs [--samples-dir samples] [--prompts-dir prompts]
                       [--prompt system.md ...] [--tokenizer-name Qwen/Qwen3-0.6B] [--tokenizer-version …]
                       [--teacher-commit …] [--student-commit …]

Layout written (manifest.json last, so its presence marks a complete scaffold)::

    runs/<id>/dataset_snapshot.json   sha256 of every sample file and every blurb (line) in it, and of
                                      every prompt/style file; `digest` = sha256 of that content
    runs/<id>/manifest.json           run id, created time, project git commit, tokenizer, commits,
                                      snapshot digest, where the corpus was read from
    runs/<id>/rotations.jsonl         empty JSON-lines rotations ledger (the rotate flow appends)
    runs/<id>/ledgers/dataset/        one parquet row per file and per blurb (lib.ledgers 'dataset')
    runs/<id>/{checkpoints,activations,logs,figures}/

Re-running with the same id and the same inputs (snapshot digest, tokenizer, commits) changes
nothing; the same id with different inputs raises BadInputError listing what changed (down to
the blurb). Everything is checked before the first write: refused input writes nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from lib.core.errors import BadInputError
from lib.core.options import Frozen, Options, PathStr, Seq
from lib.store.atomic import locked, write_text_atomic
from lib.store.corpus import PROJECT_ROOT, PROMPTS_DIR, SAMPLES_DIR
from lib.store.snapshot import SNAPSHOT_VERSION, build_snapshot, diff_snapshots

MANIFEST_NAME = "manifest.json"


SNAPSHOT_NAME = "dataset_snapshot.json"


ROTATIONS_LEDGER = "rotations.jsonl"


RUN_SUBDIRS = ("ledgers", "checkpoints", "activations", "logs", "figures")


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# The manifest fields that define "the same inputs" for an idempotent re-run.
INPUT_KEYS = ("snapshot_digest", "tokenizer", "teacher_commit", "student_commit")


class ScaffoldSpec(Options):
    """What `tourguide scaffold` was asked for. `prompts` (file paths, absolute or relative to
    `prompts_dir`) overrides the default list: every `prompts_dir/**/*.md`."""

    label = "scaffold spec"

    run_id: str = Field(description="names the folder under runs_root (checked with --run-id's rules)")
    runs_root: PathStr = Field("runs", description="where run folders live")
    samples_dir: PathStr = Field(str(SAMPLES_DIR), description="the corpus: *.txt, one blurb per line")
    prompts_dir: PathStr = Field(str(PROMPTS_DIR), description="prompt / style files (*.md)")
    prompts: Seq[str] = Field((), description="prompt files to snapshot (default: every prompts_dir/**/*.md)")
    tokenizer_name: str | None = Field(None, description="recorded in the manifest")
    tokenizer_version: str | None = Field(None, description="recorded in the manifest")
    teacher_commit: str | None = Field(None, description="recorded in the manifest")
    student_commit: str | None = Field(None, description="recorded in the manifest")


def new_run_id(kind: str = "run") -> str:
    """A fresh id such as run-20261130T023000-1a2b3c (UTC time; the random tail keeps two ids
    made in the same second apart)."""
    return time.strftime(f"{kind}-%Y%m%dT%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str, key: str = "--run-id") -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise BadInputError(f"{key} {run_id!r}: use 1-128 letters, digits, '.', '_' or '-' (starting with a letter or "
                            "digit); it names a folder under the runs root")
    return run_id


def run_dir_for(runs_root: str | os.PathLike, run_id: str) -> Path:
    return Path(runs_root) / check_run_id(run_id)


def project_commit(root: str | os.PathLike = PROJECT_ROOT) -> str:
    """`git rev-parse HEAD` of the project checkout, or "unknown" (no git, not a repo, timeout)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"


def _inputs(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in INPUT_KEYS}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: {what} is not valid JSON ({exc}); restore it or scaffold a new run id") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: {what} must be a JSON object")
    return data


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def scaffold_run(spec: ScaffoldSpec) -> dict[str, Any]:
    """Create (or confirm) `runs_root/run_id`. Returns the manifest plus {"run_dir", "created"}.

    Raises BadInputError (writing nothing) for a bad run id, a missing corpus folder or prompt,
    or an existing run with the same id whose inputs differ (the message lists the changes).
    """
    run_dir = run_dir_for(spec.runs_root, spec.run_id)
    snapshot = build_snapshot(spec.samples_dir, spec.prompts_dir, spec.prompts)
    n_blurbs = sum(len(f["blurbs"]) for f in snapshot["samples"])
    manifest = {
        "version": SNAPSHOT_VERSION, "run_id": spec.run_id, "created_at": _now(), "git_commit": project_commit(),
        "tokenizer": {"name": spec.tokenizer_name, "version": spec.tokenizer_version},
        "teacher_commit": spec.teacher_commit, "student_commit": spec.student_commit,
        "snapshot_digest": snapshot["digest"], "snapshot": SNAPSHOT_NAME,
        "samples_dir": str(Path(spec.samples_dir).resolve()), "prompts_dir": str(Path(spec.prompts_dir).resolve()),
        "prompts": [p["file"] for p in snapshot["prompts"]] if spec.prompts else None,
        "n_sample_files": len(snapshot["samples"]), "n_blurbs": n_blurbs, "n_prompt_files": len(snapshot["prompts"]),
    }
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"{run_dir}: exists and is not a folder; pick another --run-id or --runs-root")
    existing = _existing_manifest(run_dir)
    if existing is not None:
        _refuse_if_changed(run_dir, existing, manifest, snapshot)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir / ".scaffold.lock"):
        existing = _existing_manifest(run_dir)  # another scaffold may have won the race
        if existing is not None:
            _refuse_if_changed(run_dir, existing, manifest, snapshot)
            _ensure_layout(run_dir)  # repair deleted sub-folders; never rewrite a file
            return {**existing, "run_dir": str(run_dir), "created": False}
        _ensure_layout(run_dir)
        _write_json(run_dir / SNAPSHOT_NAME, snapshot)
        _record_dataset_ledger(run_dir, spec.run_id, snapshot)
        _write_json(run_dir / MANIFEST_NAME, manifest)  # last: marks the scaffold complete
    return {**manifest, "run_dir": str(run_dir), "created": True}


def _now() -> str:
    from lib.store.ledgers import now_iso

    return now_iso()


def _existing_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST_NAME
    return read_json(path, "run manifest") if path.exists() else None


def _refuse_if_changed(run_dir: Path, existing: Mapping[str, Any], manifest: Mapping[str, Any],
                       snapshot: Mapping[str, Any]) -> None:
    old, new = _inputs(existing), _inputs(manifest)
    if old == new:
        return
    lines = [f"{k}: {old[k]!r} → {new[k]!r}" for k in INPUT_KEYS if k != "snapshot_digest" and old[k] != new[k]]
    if old["snapshot_digest"] != new["snapshot_digest"]:
        lines.append(f"snapshot_digest: {str(old['snapshot_digest'])[:12]}… → {new['snapshot_digest'][:12]}…")
        snap_path = run_dir / SNAPSHOT_NAME
        if snap_path.exists():
            lines += diff_snapshots(read_json(snap_path, "dataset snapshot"), snapshot)
    shown = "\n  ".join(lines[:60]) + (f"\n  … and {len(lines) - 60} more" if len(lines) > 60 else "")
    raise BadInputError(
        f"run {run_dir} already exists with different inputs:\n  {shown}\n"
        f"Fix: pick a new --run-id for the changed inputs, or restore the files/flags recorded in "
        f"{run_dir / MANIFEST_NAME}.")


def _ensure_layout(run_dir: Path) -> None:
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(exist_ok=True)
    rot = run_dir / ROTATIONS_LEDGER
    if not rot.exists():
        write_text_atomic(rot, "")


def _record_dataset_ledger(run_dir: Path, run_id: str, snapshot: Mapping[str, Any]) -> None:
    from lib.store.ledgers import append_rows, ledger_path, now_iso, read_ledger

    path = ledger_path(run_dir, "dataset")
    if len(read_ledger(path, "dataset")):
        return  # a crashed earlier scaffold already recorded them (manifest not yet written)
    at = now_iso()
    rows: list[dict[str, Any]] = []
    for f in snapshot["samples"]:
        rows.append({"run_id": run_id, "file": f["file"], "kind": "sample_file", "line": None, "sha256": f["sha256"],
                     "recorded_at": at})
        rows += [{"run_id": run_id, "file": f["file"], "kind": "blurb", "line": b["line"], "sha256": b["sha256"],
                  "recorded_at": at} for b in f["blurbs"]]
    rows += [{"run_id": run_id, "file": p["file"], "kind": "prompt", "line": None, "sha256": p["sha256"],
              "recorded_at": at} for p in snapshot["prompts"]]
    append_rows(path, "dataset", rows)


class RunInfo(Frozen):
    """A scaffolded run as consumers see it."""

    run_dir: str
    run_id: str
    manifest: dict[str, Any]
    snapshot_digest: str
    sample_files: tuple[str, ...]  # absolute paths of the snapshot's sample files, in snapshot order


def load_run(runs_root: str | os.PathLike, run_id: str) -> RunInfo:
    """Read manifest.json (BadInputError naming the fix when the run was never scaffolded)."""
    run_dir = run_dir_for(runs_root, run_id)
    if not (run_dir / MANIFEST_NAME).exists():
        raise BadInputError(f"{run_dir / MANIFEST_NAME}: not found: run {run_id!r} was never scaffolded under "
                            f"{runs_root}; run `tourguide scaffold --run-id {run_id} --runs-root {runs_root}` first")
    manifest = read_json(run_dir / MANIFEST_NAME, "run manifest")
    snapshot = read_json(run_dir / SNAPSHOT_NAME, "dataset snapshot")
    files = tuple(str(Path(manifest["samples_dir"]) / f["file"]) for f in snapshot["samples"])
    return RunInfo(run_dir=str(run_dir), run_id=run_id, manifest=manifest,
                   snapshot_digest=manifest["snapshot_digest"], sample_files=files)


def verify_snapshot(runs_root: str | os.PathLike, run_id: str) -> RunInfo:
    """Re-hash the corpus the run was scaffolded from and require it unchanged (the QA runs on
    the frozen snapshot). Raises BadInputError listing every changed file/blurb."""
    info = load_run(runs_root, run_id)
    run_dir = Path(info.run_dir)
    recorded = read_json(run_dir / SNAPSHOT_NAME, "dataset snapshot")
    # --prompt lists are re-read as recorded; the default list is re-globbed (a new file is a change)
    prompts = info.manifest.get("prompts") or ()
    try:
        current = build_snapshot(info.manifest["samples_dir"], info.manifest["prompts_dir"], prompts)
    except BadInputError as exc:
        raise BadInputError(f"run {run_id}: the corpus it was scaffolded from cannot be re-read: {exc}") from None
    if current["digest"] != recorded["digest"] or recorded["digest"] != info.snapshot_digest:
        changes = diff_snapshots(recorded, current) or ["(snapshot file and manifest digest disagree)"]
        raise BadInputError(
            f"run {run_id}: the corpus changed since it was scaffolded (snapshot {info.snapshot_digest[:12]}…):\n  "
            + "\n  ".join(changes[:40])
            + f"\nFix: restore the files under {info.manifest['samples_dir']} / {info.manifest['prompts_dir']}, "
              "or scaffold a new run id for the new corpus.")
    return info
