"""The frozen corpus: tour-stop blurbs in `samples/*.txt`, one per line, and text-file parsing.

`load_texts(texts, text_files)` is what capture uses: explicit texts, then every line of each
text file, or (neither given) every line of `samples/*.txt` in sorted file order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lib.core.digests import sha256_text
from lib.core.errors import BadInputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


SAMPLES_DIR = PROJECT_ROOT / "samples"


PROMPTS_DIR = PROJECT_ROOT / "prompts"


@dataclass(frozen=True)
class Sample:
    """One text to capture. `sample_id` is stable: '<source>:<line>' or 'text:<n>'."""

    index: int
    sample_id: str
    text: str

    @property
    def text_sha256(self) -> str:
        return sha256_text(self.text)


def read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """Non-empty lines of a UTF-8 text file as (line number, text). Clear errors for bad files."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: text file not found")
    if p.is_dir():
        raise BadInputError(f"{p}: is a folder; --text-file takes a newline-delimited UTF-8 file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{p}: not valid UTF-8 (byte {exc.start}: {exc.reason}); re-save it as UTF-8") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise BadInputError(f"{p}: has no non-empty lines; put one text per line")
    return lines


def sample_files(samples_dir: str | os.PathLike = SAMPLES_DIR) -> list[Path]:
    files = sorted(Path(samples_dir).glob("*.txt"))
    if not files:
        raise BadInputError(f"{samples_dir}: no *.txt sample files found")
    return files


def load_texts(texts: list[str] | None = None, text_files: list[str] | None = None,
               samples_dir: str | os.PathLike = SAMPLES_DIR, limit: int | None = None) -> list[Sample]:
    """Resolve the capture's text list (see module docstring). `limit` keeps the first n."""
    out: list[Sample] = []
    for n, t in enumerate(texts or []):
        if not t or not t.strip():
            raise BadInputError(f"--text #{n + 1} is empty; give a non-empty text")
        out.append(Sample(len(out), f"text:{n}", t))
    for f in text_files or []:
        for lineno, line in read_lines(f):
            out.append(Sample(len(out), f"{Path(f).name}:{lineno}", line))
    if not texts and not text_files:
        for f in sample_files(samples_dir):
            for lineno, line in read_lines(f):
                out.append(Sample(len(out), f"{f.name}:{lineno}", line))
    if limit is not None:
        if limit <= 0:
            raise BadInputError(f"--limit must be positive, got {limit}")
        out = out[:limit]
    return out
