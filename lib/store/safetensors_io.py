"""The one safetensors I/O module (work in progress: small numpy files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lib.core.errors import BadInputError


def save_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.numpy import save

    from lib.store.atomic import write_bytes_atomic

    payload = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata or None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, payload)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable safetensors file ({exc.__class__.__name__}: {str(exc)[:100]})") from None
