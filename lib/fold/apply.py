"""Applying one tensor's `TensorOps`: float64 chunks along the internal axis, one cast at the end."""

from __future__ import annotations

import numpy as np

from lib.core.errors import BadInputError
from lib.fold.options import CHUNK_BYTES, FoldOptions
from lib.fold.plan import TensorOps



def apply_tensor_ops(src, ops: TensorOps, out_dtype=None, chunk_bytes: int = CHUNK_BYTES, device: str = "cpu"):
    """Apply `ops` to CPU torch tensor `src` (any float dtype) in float64, chunked along the
    internal axis, and cast once to `out_dtype` (default: src.dtype). Returns a new CPU tensor of
    src's shape. `device` runs the float64 chunk math there (e.g. 'cuda'; the result comes back)."""
    import torch

    out_dtype = out_dtype or src.dtype
    if ops.is_identity:
        return src if src.dtype == out_dtype else src.to(out_dtype)
    if ops.fill_ones:
        return torch.ones(src.shape, dtype=out_dtype)
    if ops.blocks is None and ops.scale is None and ops.rotation is None:
        # A pure permutation moves values without arithmetic: exact in the stored dtype, and
        # I/O-bound instead of paying two float64 conversions.
        dim = 1 if ops.orient == "cols" else 0
        return src.index_select(dim, torch.from_numpy(ops.gather)).to(out_dtype)
    out = torch.empty(src.shape, dtype=out_dtype)
    view = {"rows": lambda t: t, "cols": lambda t: t.T, "vec_internal": lambda t: t[:, None],
            "vec_residual": lambda t: t[None, :]}[ops.orient]
    x, y = view(src), view(out)
    m, n = x.shape
    bs = ops.blocks.shape[1] if ops.blocks is not None else 1
    step = max(bs, (chunk_bytes // max(1, 8 * n)) // bs * bs)
    dev = torch.device(device)

    def f64(arr: np.ndarray | None):
        return None if arr is None else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(dev)

    gather = torch.from_numpy(ops.gather) if ops.gather is not None else None
    blocks, scale, rot = f64(ops.blocks), f64(ops.scale), f64(ops.rotation)
    for a in range(0, m, step):
        b = min(m, a + step)
        # Always a fresh float64 tensor (never a view of src: the in-place scale below must not
        # write into the caller's tensor when src is already float64).
        c = (x[gather[a:b]] if gather is not None else x[a:b]).to(dev, torch.float64, copy=True)
        if blocks is not None:
            c = torch.bmm(blocks[a // bs:b // bs], c.reshape(-1, bs, n)).reshape(-1, n)
        if scale is not None:
            c.mul_(scale)
        if rot is not None:
            c = c @ rot
        y[a:b] = c.to(out_dtype).cpu()  # the one cast (on the device), then back to host memory
    return out


def _math_device(options: FoldOptions) -> str:
    from lib.models.loading import pick_device

    device = pick_device(options.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BadInputError(f"--fold-device {options.device}: no CUDA device is visible here; use cpu")
    return device


def _out_dtype(src_dtype, options: FoldOptions):
    if options.dtype is None or not src_dtype.is_floating_point:
        return src_dtype
    from lib.core.dtypes import torch_dtype

    return torch_dtype(options.dtype)
