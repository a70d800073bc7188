"""Applying one tensor's `TensorOps`: float64 chunks along the internal axis, one cast at the end.

A residual rotation into a bf16/fp16 output runs its GEMM in float32 (2-3x float64's speed on
CPU, far more on GPU): those dtypes keep 8/11 mantissa bits, and float32's error is ~2^-24 of
the row norm. The few entries whose float32 result lies within that error of a rounding
boundary of the output dtype are recomputed in float64 (`_repair_near_boundaries`), so the
output equals the float64 result's one cast. Norm gains, head blocks and float32/float64
outputs stay in float64 throughout.
"""

from __future__ import annotations

import warnings

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
    rot32 = rot.float() if rot is not None and out_dtype in (torch.bfloat16, torch.float16) else None
    for a in range(0, m, step):
        b = min(m, a + step)
        # Always a fresh float64 tensor (never a view of src: the in-place scale below must not
        # write into the caller's tensor when src is already float64).
        c = (x[gather[a:b]] if gather is not None else x[a:b]).to(dev, torch.float64, copy=True)
        if blocks is not None:
            c = torch.bmm(blocks[a // bs:b // bs], c.reshape(-1, bs, n)).reshape(-1, n)
        if scale is not None:
            c.mul_(scale)
        if rot32 is not None:
            c = _rotate_fp32(c, rot, rot32, out_dtype)
        elif rot is not None:
            c = c @ rot
        y[a:b] = c.to(out_dtype).cpu()  # the one cast (on the device), then back to host memory
    return out


# float32 GEMM error on a row a: |err| <= ERR_FACTOR * 2^-24 * ||a||_2 * max_j ||q_j||_2. Not a
# worst-case bound (n*u*|a|.|q| would flag every entry): measured on CPU (MKL sgemm, random
# rotations, bf16 rows with outliers), max |err| / (2^-24 ||a||) = 1.57 / 0.99 / 0.46 at
# n = 512 / 1024 / 4096; the factor keeps >= 2.5x margin there and more for small n.
def _err_factor(n: int) -> float:
    return max(4.0, 64.0 / n ** 0.5)


def _rotate_fp32(c64, rot64, rot32, out_dtype):
    """c64 @ rot64 computed as a float32 GEMM. Entries whose float32 error bound could move the
    cast to `out_dtype` by more than one unit (results near zero, where the row cancels), and
    for float16 (3 more mantissa bits, so 8x more entries near a midpoint) every entry within
    the bound of a rounding midpoint, are recomputed in float64. Returns float32 (the repaired
    entries already rounded to `out_dtype`, so the final cast leaves them alone)."""
    import torch

    y = c64.float() @ rot32
    tau = (_err_factor(c64.shape[1]) * 2.0 ** -24 * float(rot64.norm(dim=0).max())) * c64.norm(dim=1, keepdim=True)
    flag = _near_boundaries(y, tau.float(), out_dtype, midpoints=out_dtype == torch.float16)
    if bool(flag.any()):
        idx = flag.nonzero().T
        # sampled dense-dense matmul: float64 dot products at the flagged entries only
        with warnings.catch_warnings():  # "sparse CSR support is in beta": noise on every fold
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_coo_tensor(idx, torch.zeros(idx.shape[1], dtype=c64.dtype, device=c64.device),
                                              tuple(y.shape), is_coalesced=True).to_sparse_csr()
            exact = torch.sparse.sampled_addmm(pattern, c64, rot64, beta=0.0).to_sparse_coo().coalesce()
        i, j = exact.indices()
        y[i, j] = exact.values().to(out_dtype).float()
    return y


def _near_boundaries(y, tau, out_dtype, midpoints: bool):
    """Entries of float32 `y` whose true value, within `tau`, may round to another `out_dtype`
    value than `y` does: more than half a unit away (always), or across a midpoint (`midpoints`)."""
    import torch

    mant = 8 if out_dtype == torch.bfloat16 else 11  # significand bits incl. the implicit one
    # more than half a unit: a unit is >= |r| * 2^-mant (half that just below a power of two),
    # so |y| <= tau * 2^(mant+2) covers it with margin, in one cheap pass
    flag = y.abs() <= tau * 2.0 ** (mant + 2)
    if midpoints:
        r = y.to(out_dtype).float()
        m, e = torch.frexp(r)  # r = m * 2^e, |m| in [0.5, 1)
        info = torch.finfo(out_dtype)
        spacing = torch.ldexp(torch.ones_like(r), e - mant).clamp_min(info.smallest_normal * info.eps)
        below = torch.where(m.abs() == 0.5, spacing / 2, spacing)  # toward zero from a power of two
        off = y - r
        flag |= torch.where(off * r.sign() < 0, below, spacing) / 2 - off.abs() <= tau
    return flag


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
