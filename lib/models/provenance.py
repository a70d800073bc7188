"""What a checkpoint is, for reports: its revision and its tokenizer, read from the files alone
(no weights, no tokenizer load).

    describe_checkpoint("Qwen/Qwen3-0.6B")   → revision = the hub commit (snapshot folder name)
    describe_checkpoint("runs/x/checkpoints/student")
                                             → revision = sha256 of the folder's files

The tokenizer's `name` is its `name_or_path` (the reference it loads from, as `from_pretrained`
records it), `version` the hub commit or, for a local folder, a digest of the tokenizer files
only: two checkpoints that share a tokenizer show the same version whatever their weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lib.core.digests import sha256_file, sha256_json
from lib.models.loading import resolve_model

# The files `AutoTokenizer.from_pretrained` reads (whichever of them a tokenizer has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja")


def describe_checkpoint(ref: str, revision: str | None = None, hf_home: str | None = None,
                        hf_hub_cache: str | None = None) -> dict[str, Any]:
    """{"ref", "revision", "tokenizer": {"name", "version", "class"}}; ModelLoadError as
    `resolve_model` (a missing folder, a hub id not in the cache)."""
    model = resolve_model(ref, revision, hf_home, hf_hub_cache)
    folder = Path(model.local_dir or ref)
    files = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    tok: dict[str, Any] = {"name": None, "version": None, "class": None}
    if files:
        hub = not model.revision.startswith("sha256:")
        digest = "sha256:" + sha256_json([[n, sha256_file(folder / n)] for n in files])[:16]
        tok = {"name": ref, "version": model.revision if hub else digest, "class": _tokenizer_class(folder)}
    return {"ref": ref, "revision": model.revision, "tokenizer": tok}


def _tokenizer_class(folder: Path) -> str | None:
    try:
        cls = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return cls if isinstance(cls, str) else None
