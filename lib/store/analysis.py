"""Per-layer activation summaries of shards (mean / max |activation|), for `tourguide analyze`.

    from lib.analysis import summarize_activation_file, format_summary_table
    print(format_summary_table(summarize_activation_file("runs/x/activations/teacher")))

Reads our safetensors shards (a file, or every shard of a folder) and legacy `.pt` files, the
latter only with `torch.load(weights_only=True)` (no arbitrary code from strangers' pickles).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.core.errors import BadInputError
from lib.store.shards import ACT_PREFIX, load_shard


@dataclass(frozen=True)
class LayerSummary:
    """Statistics of one tensor name over all tokens of the files summarised (float64)."""

    name: str
    width: int
    n_tokens: int
    mean: float
    mean_abs: float
    max_abs: float
    rms: float


def _tensors_of(path: Path) -> dict[str, Any]:
    if path.suffix == ".pt":
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BadInputError(f"{path}: not a tensor-only .pt file ({exc.__class__.__name__}); "
                                "only weights_only=True loading is allowed") from None
        if isinstance(obj, torch.Tensor):
            return {"act/tensor": obj}
        if isinstance(obj, dict):
            return {(k if str(k).startswith(ACT_PREFIX) or k in ("input_ids", "logits") else ACT_PREFIX + str(k)): v
                    for k, v in obj.items() if isinstance(v, torch.Tensor)}
        raise BadInputError(f"{path}: .pt file holds {type(obj).__name__}, expected a tensor or a dict of tensors")
    if path.suffix == ".safetensors":
        return load_shard(path)[0]
    raise BadInputError(f"{path}: unsupported file type {path.suffix!r}; pass a .safetensors shard, a legacy .pt file or a folder of shards")


def summarize_activation_file(path: str | os.PathLike) -> list[LayerSummary]:
    """Summaries per `act/*` tensor (the hook point name without the prefix), in file order.

    `path` may be a shard, a legacy `.pt` file, or a folder whose `*.safetensors` (else `*.pt`)
    files are pooled. Tensors are [T, d] (a leading batch dim is flattened).
    """
    import torch

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: not found; pass a shard file or a capture folder")
    files = (sorted(p.glob("*.safetensors")) or sorted(p.glob("*.pt"))) if p.is_dir() else [p]
    if not files:
        raise BadInputError(f"{p}: folder holds no .safetensors or .pt shards")
    acc: dict[str, list[float]] = {}
    widths: dict[str, int] = {}
    for f in files:
        for name, t in _tensors_of(f).items():
            if not name.startswith(ACT_PREFIX):
                continue
            # leading dims spelled out: reshape(-1, 0) is ambiguous for an empty [T, 0] or [0] tensor
            x = t.detach().to(torch.float64).reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.ndim >= 1 else t.reshape(1, 1).double()
            key = name[len(ACT_PREFIX):]
            s = acc.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0.0])  # n_tokens, sum, sum|x|, sum x², max|x|
            s[0] += x.shape[0]
            s[1] += float(x.sum())
            s[2] += float(x.abs().sum())
            s[3] += float((x * x).sum())
            s[4] = max(s[4], float(x.abs().max()) if x.numel() else 0.0)
            widths[key] = int(x.shape[-1])
    out = []
    for key, (n, sm, sa, sq, mx) in acc.items():
        cnt = max(n * widths[key], 1)
        out.append(LayerSummary(key, widths[key], int(n), sm / cnt, sa / cnt, mx, (sq / cnt) ** 0.5))
    if not out:
        raise BadInputError(f"{p}: no act/* tensors found (was it captured with --layer?)")
    return out


def format_summary_table(rows: list[LayerSummary]) -> str:
    """A fixed-width text table: layer, width, tokens, mean, mean|x|, max|x|, rms."""
    w = max([len("layer"), *(len(r.name) for r in rows)])
    lines = [f"{'layer':<{w}}  {'width':>6}  {'tokens':>8}  {'mean':>10}  {'mean|x|':>10}  {'max|x|':>10}  {'rms':>10}"]
    for r in rows:
        lines.append(f"{r.name:<{w}}  {r.width:>6}  {r.n_tokens:>8}  {r.mean:>10.4g}  {r.mean_abs:>10.4g}  {r.max_abs:>10.4g}  {r.rms:>10.4g}")
    return "\n".join(lines)
