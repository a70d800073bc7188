"""Loading HF causal LMs and tokenizers the real way (`from_pretrained`), with clear errors.

A model reference is a local folder or a hub id. Hub ids work offline only when already in the
HF cache (`--hf-home` / `--hf-hub-cache` pick which one); otherwise the error names the id and
the cache path in use. `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lib.core.digests import sha256_file, sha256_json
from lib.core.dtypes import torch_dtype
from lib.core.errors import ModelLoadError

_HASH_LIMIT = 2 << 30  # hash weight files fully below 2 GiB total; above, fingerprint by size+mtime


def looks_like_path(ref: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with a slash is meant as a folder."""
    return ref.startswith(("/", "./", "../", "~", ".")) or ref.count("/") > 1


def hub_cache_dir(hf_home: str | None = None, hf_hub_cache: str | None = None) -> str:
    """The HF hub cache folder that loading will use (for messages and `cache_dir=`)."""
    if hf_hub_cache:
        return str(hf_hub_cache)
    if hf_home:
        return str(Path(hf_home) / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: where it loads from and a content revision for cache keys."""

    ref: str  # what the user passed
    local_dir: str | None  # absolute folder when local (or found in the HF cache)
    revision: str  # hub commit, or 'sha256:<digest>' of a local folder's files
    cache_dir: str


def resolve_model(ref: str, revision: str | None = None, hf_home: str | None = None,
                  hf_hub_cache: str | None = None) -> ModelRef:
    """Resolve `ref` without loading weights. Raises ModelLoadError for a missing local folder
    or a hub id that is not in the cache while offline."""
    cache = hub_cache_dir(hf_home, hf_hub_cache)
    try:
        p = Path(ref).expanduser()
        exists = p.exists()
    except (OSError, RuntimeError):  # an over-long name or '~nosuchuser': not a folder we can use
        p, exists = Path(ref), False
    if exists:
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: not a model folder (no config.json); pass a folder written by save_pretrained or a hub id")
        return ModelRef(ref, str(p.resolve()), folder_revision(str(p.resolve())), cache)
    if looks_like_path(ref):
        raise ModelLoadError(f"{ref}: local model folder not found; check the path (or pass a hub id such as Qwen/Qwen3-0.6B)")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(ref, revision=revision, cache_dir=cache, local_files_only=True)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        raise ModelLoadError(
            f"model {ref!r} (revision {revision or 'main'}) is not in the HF cache at {cache}"
            f"{' and HF_HUB_OFFLINE=1 forbids downloading' if offline else ' and this machine cannot download it'}. "
            f"Fix: download it on a connected machine into that cache (huggingface-cli download {ref}), "
            f"point --hf-hub-cache/--hf-home at a cache that has it, or pass a local folder. ({exc.__class__.__name__})"
        ) from None
    return ModelRef(ref, folder, Path(folder).name, cache)


def folder_revision(folder: str) -> str:
    """Content digest of a local model folder: sha256 of every file (or size+mtime when huge).

    Hashing gigabytes twice per process would be slow, so digests are remembered, but keyed by
    the folder's stat signature (every file's name, size, mtime and inode): a long-lived worker
    whose model folder was rewritten in place gets the new revision, never the cached old one."""
    root = Path(folder)
    files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
    stats = [(str(f.relative_to(root)), f.stat()) for f in files]
    signature = tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)
    return _folder_digest(str(root), signature)


@lru_cache(maxsize=32)
def _folder_digest(folder: str, signature: tuple[tuple[str, int, int, int], ...]) -> str:
    if sum(size for _, size, _, _ in signature) <= _HASH_LIMIT:
        listing = [[name, sha256_file(Path(folder) / name)] for name, *_ in signature]
    else:
        listing = [[name, size, mtime] for name, size, mtime, _ in signature]
    return "sha256:" + sha256_json(listing)[:32]


def read_config(model: ModelRef) -> dict[str, Any]:
    assert model.local_dir is not None
    return json.loads((Path(model.local_dir) / "config.json").read_text())


def load_tokenizer(model: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.local_dir or model.ref, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"{model.ref}: tokenizer could not be loaded ({exc.__class__.__name__}: {str(exc)[:200]})") from None


def load_model(model: ModelRef, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """`AutoModelForCausalLM.from_pretrained` in an explicit dtype (the checkpoint's own dtype
    would be bf16 for most hub models, ~10x slower on CPU), eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(model.local_dir or model.ref, dtype=torch_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{model.ref}: model could not be loaded ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    return m.to(device).eval()


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
