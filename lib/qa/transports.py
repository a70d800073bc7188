"""QA transports: maps from a variant's residual basis to the teacher's (rotation, PCA
adapter, permutation), loaded from safetensors files and chained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lib.core.errors import BadInputError
from lib.store.safetensors_io import load_tensors


@dataclass
class Transport:
    """One loaded map x [n, d_in] ↦ [n, d_out] (float64). `apply(x, layer)`.

    rotation: x @ Q; permutation: x[:, perm]; pca_adapter: (x − μ_in) @ P + μ_out with
    P = projection, or B_s R_k B_tᵀ from the bases (R_k = I when absent); means are [d] or
    per layer [L, d] (row = position of the layer in the file's `layers` metadata)."""

    kind: str
    path: str
    d_in: int
    d_out: int
    matrix: Any = None  # torch float64 [d_in, d_out] (rotation / PCA projection)
    perm: Any = None  # torch int64 [d]
    mean_in: Any = None  # None, [d_in] or [L, d_in]
    mean_out: Any = None
    layers: tuple[str, ...] = ()

    def _mean(self, mean: Any, layer: str):
        if mean is None or mean.ndim == 1:
            return mean
        return mean[self.layers.index(layer)]

    def check_layer(self, layer: str) -> None:
        per_layer = any(m is not None and m.ndim == 2 for m in (self.mean_in, self.mean_out))
        if per_layer and layer not in self.layers:
            raise BadInputError(f"{self.path}: per-layer means cover {list(self.layers)}, not {layer!r}; "
                                "solve the adapter over the layers you compare (or drop that layer)")

    def apply(self, x: Any, layer: str):
        if self.kind == "permutation":
            return x[:, self.perm]
        mi, mo = self._mean(self.mean_in, layer), self._mean(self.mean_out, layer)
        y = (x - mi if mi is not None else x) @ self.matrix
        return y + mo if mo is not None else y


def load_transport(kind: str, path: str | os.PathLike) -> Transport:
    """Read one transport file (see `Transport`); BadInputError names the file, tensor and shape."""
    import torch

    path = str(path)
    t, meta = load_tensors(path, framework="pt")

    def need(name: str, ndim: int):
        if name not in t:
            raise BadInputError(f"{path}: a {kind} file needs tensor {name!r}; it holds {sorted(t)}")
        x = t[name]
        if x.ndim != ndim:
            raise BadInputError(f"{path}: tensor {name!r} must be {ndim}-D, got shape {list(x.shape)}")
        return x

    if kind == "rotation":
        q = need("rotation", 2).to(torch.float64)
        return Transport(kind, path, q.shape[0], q.shape[1], matrix=q)
    if kind == "permutation":
        p = need("permutation", 1).to(torch.long)
        if sorted(p.tolist()) != list(range(p.numel())):
            raise BadInputError(f"{path}: 'permutation' [{p.numel()}] is not a permutation of 0..{p.numel() - 1}")
        return Transport(kind, path, p.numel(), p.numel(), perm=p)
    if kind != "pca_adapter":
        raise BadInputError(f"{path}: unknown transport kind {kind!r}; use rotation, pca_adapter or permutation")
    if "projection" in t:
        m = need("projection", 2).to(torch.float64)
    else:
        bs, bt = need("student_basis", 2).to(torch.float64), need("teacher_basis", 2).to(torch.float64)
        k = bs.shape[1]
        rk = t["k_rotation"].to(torch.float64) if "k_rotation" in t else torch.eye(k, dtype=torch.float64)
        if bt.shape[1] != k or rk.shape != (k, k):
            raise BadInputError(f"{path}: student_basis {list(bs.shape)}, k_rotation {list(rk.shape)} and teacher_basis "
                                f"{list(bt.shape)} disagree on k")
        m = bs @ rk @ bt.T
    layers: tuple[str, ...] = ()
    if "layers" in meta:
        try:
            layers = tuple(json.loads(meta["layers"]))
        except (json.JSONDecodeError, TypeError):
            raise BadInputError(f"{path}: metadata 'layers' is not a JSON list of layer names") from None
    tr = Transport(kind, path, m.shape[0], m.shape[1], matrix=m, layers=layers)
    for name, width, attr in (("student_mean", m.shape[0], "mean_in"), ("teacher_mean", m.shape[1], "mean_out")):
        if name not in t:
            continue
        mean = t[name].to(torch.float64)
        if mean.shape[-1] != width or mean.ndim not in (1, 2) or (mean.ndim == 2 and mean.shape[0] != len(layers)):
            raise BadInputError(f"{path}: {name!r} has shape {list(mean.shape)}; expected [{width}] or "
                                f"[{len(layers)} layers (metadata 'layers'), {width}]")
        setattr(tr, attr, mean)
    return tr


def chain_widths(transports: Sequence[Transport], d_variant: int, d_teacher: int, where: str) -> None:
    """The chain must take the variant's width to the teacher's, link by link."""
    d = d_variant
    for t in transports:
        if t.d_in != d:
            raise BadInputError(f"{where}: transport {t.kind} {t.path} expects residual width {t.d_in}, but the "
                                f"{'variant' if t is transports[0] else 'previous transport'} gives {d}")
        d = t.d_out
    if d != d_teacher:
        hint = "give a pca_adapter transport" if not transports else "check the transport files"
        raise BadInputError(f"{where}: residual width after transports is {d}, the teacher's is {d_teacher}; "
                            f"cosines need one basis: {hint}")
