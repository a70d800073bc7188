"""The dataset snapshot: sha256 of every sample file, every blurb and every prompt file.

`build_snapshot` hashes the corpus; `diff_snapshots` says what changed, file by file and blurb by
blurb. A run records its snapshot at scaffold time (lib.store.runs) and QA re-checks it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lib.core.digests import sha256_bytes, sha256_json, sha256_text
from lib.core.errors import BadInputError
from lib.store.corpus import read_lines, sample_files

SNAPSHOT_VERSION = 1


def _prompt_files(prompts_dir: Path, prompts: Sequence[str]) -> list[tuple[str, Path]]:
    """(name recorded in the snapshot, file) for each prompt/style file, sorted by name."""
    if prompts:
        out = []
        for i, p in enumerate(prompts):
            given = Path(p)
            # relative names are looked up in the prompts folder first, then from the working directory
            path = given if given.is_absolute() or not (prompts_dir / given).is_file() else prompts_dir / given
            if not path.is_file():
                raise BadInputError(f"--prompt #{i + 1} {p!r}: file not found in --prompts-dir {prompts_dir} nor from the "
                                    "working directory; pass an existing file path")
            try:
                name = path.resolve().relative_to(prompts_dir.resolve()).as_posix()
            except ValueError:  # outside the prompts folder: record where it is
                name = str(path.resolve())
            out.append((name, path))
    else:
        if not prompts_dir.is_dir():
            raise BadInputError(f"--prompts-dir {prompts_dir}: folder not found; pass the folder holding the "
                                "prompt/style *.md files (or name files with --prompt)")
        out = [(f.relative_to(prompts_dir).as_posix(), f) for f in prompts_dir.rglob("*.md") if f.is_file()]
        if not out:
            raise BadInputError(f"--prompts-dir {prompts_dir}: no *.md prompt/style files found")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"--prompt names {dup} more than once; list each prompt file once")
    return sorted(out)


def build_snapshot(samples_dir: str | os.PathLike, prompts_dir: str | os.PathLike,
                   prompts: Sequence[str] = ()) -> dict[str, Any]:
    """Hash the corpus: every `samples_dir/*.txt` (file sha256 + one sha256 per non-empty line,
    the same text sha256 that shards record) and every prompt file (file sha256).

    Returns {"version", "samples": [...], "prompts": [...], "digest"}; the digest covers the
    names and hashes only (not the folders), so the same corpus elsewhere has the same digest.
    """
    samples_dir, prompts_dir = Path(samples_dir), Path(prompts_dir)
    if not samples_dir.is_dir():
        raise BadInputError(f"--samples-dir {samples_dir}: folder not found; pass the folder holding samples/*.txt")
    samples = []
    for f in sample_files(samples_dir):
        raw = f.read_bytes()
        blurbs = [{"line": n, "sample_id": f"{f.name}:{n}", "sha256": sha256_text(text)} for n, text in read_lines(f)]
        samples.append({"file": f.name, "sha256": sha256_bytes(raw), "bytes": len(raw), "blurbs": blurbs})
    prompt_rows = []
    for name, path in _prompt_files(prompts_dir, prompts):
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason}); re-save it as UTF-8") from None
        prompt_rows.append({"file": name, "sha256": sha256_bytes(raw), "bytes": len(raw)})
    body = {"version": SNAPSHOT_VERSION, "samples": samples, "prompts": prompt_rows}
    return {**body, "digest": sha256_json(body)}


def diff_snapshots(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two snapshots, file by file and blurb by blurb."""
    changes: list[str] = []
    for kind in ("samples", "prompts"):
        a = {r["file"]: r for r in old.get(kind, [])}
        b = {r["file"]: r for r in new.get(kind, [])}
        for name in sorted(a.keys() - b.keys()):
            changes.append(f"{kind[:-1]} file {name}: removed")
        for name in sorted(b.keys() - a.keys()):
            changes.append(f"{kind[:-1]} file {name}: added")
        for name in sorted(a.keys() & b.keys()):
            if a[name]["sha256"] == b[name]["sha256"]:
                continue
            changes.append(f"{kind[:-1]} file {name}: sha256 {a[name]['sha256'][:12]}… → {b[name]['sha256'][:12]}…")
            if kind == "samples":
                la = {x["line"]: x["sha256"] for x in a[name]["blurbs"]}
                lb = {x["line"]: x["sha256"] for x in b[name]["blurbs"]}
                for line in sorted(la.keys() | lb.keys()):
                    if la.get(line) != lb.get(line):
                        was = la.get(line, "absent")[:12]
                        now = lb.get(line, "absent")[:12]
                        changes.append(f"  blurb {name}:{line}: {was} → {now}")
    return changes


def blurb_hashes(snapshot: Mapping[str, Any]) -> dict[str, str]:
    """sample_id ('generic_en.txt:3') → text sha256, for every blurb of a snapshot."""
    return {b["sample_id"]: b["sha256"] for f in snapshot["samples"] for b in f["blurbs"]}
