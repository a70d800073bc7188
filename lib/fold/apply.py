"""Applying one tensor's `TensorOps`: float64 chunks along the internal axis, one cast at the end.

A residual rotation into a bf16/fp16 output (with no head blocks) runs as one float32 GEMM per
chunk, straight from the stored rows: bf16/fp16 values are exact in float32, and the norm gain is
folded into the rotation once per tensor (diag(γ)·Q in float64, then cast), so a chunk costs one
cast in, the GEMM and one cast out (2-3x float64's speed on CPU, far more on GPU). Those output
dtypes keep 8/11 mantissa bits and float32's error is ~2^-24 of the row norm: the few entries whose
float32 result lies within that error of a rounding boundary of the output dtype are recomputed in
float64 (`_repair`), so the output equals the float64 result's one cast. Head blocks and
float32/float64 outputs stay in float64 throughout.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

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
    if is_permutation_only(ops):
        # A pure permutation moves values without arithmetic: exact in the stored dtype, and
        # I/O-bound instead of paying two float64 conversions.
        dim = 1 if ops.orient == "cols" else 0
        return src.index_select(dim, torch.from_numpy(ops.gather)).to(out_dtype)
    out = torch.empty(src.shape, dtype=out_dtype)
    y = _VIEWS[ops.orient](out)
    for a, b, rows in tensor_op_chunks(src, ops, out_dtype, chunk_bytes, device):
        y[a:b] = rows
    return out


_VIEWS = {"rows": lambda t: t, "cols": lambda t: t.T, "vec_internal": lambda t: t[:, None],
          "vec_residual": lambda t: t[None, :]}


def is_permutation_only(ops: TensorOps) -> bool:
    return ops.blocks is None and ops.scale is None and ops.rotation is None


def streams_rows(ops: TensorOps) -> bool:
    """Whether `tensor_op_chunks` yields the output tensor's own rows, in order (orient "rows"
    with arithmetic to do): a caller can then write each chunk as it comes, never the whole."""
    return ops.orient == "rows" and not ops.is_identity and not ops.fill_ones and not is_permutation_only(ops)


def tensor_op_chunks(src, ops: TensorOps, out_dtype, chunk_bytes: int = CHUNK_BYTES, device: str = "cpu"):
    """Yield (a, b, rows a:b of the result's internal-axis-first view, as a CPU tensor in
    `out_dtype`), in order: float64 math per chunk (float32 + repairs for a rotation into
    bf16/fp16), one cast at the end of each."""
    import torch

    x = _VIEWS[ops.orient](src)
    m, n = x.shape
    bs = ops.blocks.shape[1] if ops.blocks is not None else 1
    step = max(bs, (chunk_bytes // max(1, 8 * n)) // bs * bs)
    dev = torch.device(device)

    def f64(arr: np.ndarray | None):
        return None if arr is None else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(dev)

    gather = torch.from_numpy(ops.gather) if ops.gather is not None else None
    blocks, scale, rot = f64(ops.blocks), f64(ops.scale), f64(ops.rotation)
    fp32 = (_Fp32Rotation(rot if scale is None else scale[:, None] * rot, out_dtype)
            if rot is not None and blocks is None and out_dtype in (torch.bfloat16, torch.float16) else None)
    for a in range(0, m, step):
        b = min(m, a + step)
        rows = x[gather[a:b]] if gather is not None else x[a:b]
        if fp32 is not None:
            yield a, b, fp32(rows.to(dev)).to(out_dtype).cpu()  # the one cast
            continue
        # Always a fresh float64 tensor (never a view of src: the in-place scale below must not
        # write into the caller's tensor when src is already float64).
        c = rows.to(dev, torch.float64, copy=True)
        if blocks is not None:
            c = torch.bmm(blocks[a // bs:b // bs], c.reshape(-1, bs, n)).reshape(-1, n)
        if scale is not None:
            c.mul_(scale)
        if rot is not None:
            c = c @ rot
        yield a, b, c.to(out_dtype).cpu()  # the one cast (on the device), then back to host memory


# float32 GEMM error on a row a: |err| <= ERR_FACTOR * 2^-24 * ||a||_2 * max_j ||q_j||_2. Not a
# worst-case bound (n*u*|a|.|q| would flag every entry): measured on CPU (MKL sgemm, random
# rotations, bf16 rows with outliers), max |err| / (2^-24 ||a||) = 1.57 / 0.99 / 0.46 at
# n = 512 / 1024 / 4096; the factor keeps >= 2.5x margin there and more for small n.
def _err_factor(n: int) -> float:
    return max(4.0, 64.0 / n ** 0.5)


class _Fp32Rotation:
    """rows @ rot64 for one tensor, as a float32 GEMM with float64 repairs (module docstring).
    Built once per tensor: the float32 copy of the map, its largest column norm, and workspaces
    reused from chunk to chunk (a fresh multi-MB tensor per step costs page faults: casting a
    chunk into a reused buffer measured 3.7x faster than into a new one)."""

    def __init__(self, rot64, out_dtype) -> None:
        self.rot64, self.rot32, self.out_dtype = rot64, rot64.float(), out_dtype
        # column-major float64 map for the repairs: each sampled dot product reads one contiguous
        # column (2x faster than strided reads of a row-major matrix)
        self.rot64_cols = rot64.T.contiguous().T
        self.col_norm = float(rot64.norm(dim=0).max())
        self._work: dict[str, Any] = {}

    def _buf(self, key: str, shape: tuple[int, ...], dtype):
        t = self._work.get(key)
        if t is None or t.dtype != dtype or t.numel() < math.prod(shape):
            t = self._work[key] = self.rot32.new_empty(math.prod(shape), dtype=dtype)
        return t[:math.prod(shape)].view(shape)

    def __call__(self, rows):
        """Float32 [m, n] results of rows [m, k] (any float dtype, exact in float32 when bf16/fp16)
        @ rot64, valid until the next call. Entries whose float32 error bound could move the cast
        to `out_dtype` by more than one unit (results near zero, where the row cancels), and for
        float16 (3 more mantissa bits, so 8x more entries near a midpoint) every entry within the
        bound of a rounding midpoint, are recomputed in float64, already rounded to `out_dtype`."""
        import torch

        (m, k), n = rows.shape, self.rot32.shape[1]
        c32 = self._buf("c32", (m, k), torch.float32).copy_(rows)
        y = torch.matmul(c32, self.rot32, out=self._buf("y", (m, n), torch.float32))
        tau = (_err_factor(k) * 2.0 ** -24 * self.col_norm) * torch.linalg.vector_norm(c32, dim=1, keepdim=True)
        flag = _near_boundaries(y, tau, self.out_dtype, midpoints=self.out_dtype == torch.float16, buf=self._buf)
        self._repair(y, flag, c32)
        return y

    def _repair(self, y, flag, c32) -> None:
        import torch

        flat = flag.view(-1).nonzero().squeeze(1)  # row-major: i ascending, j ascending within a row
        if not len(flat):
            return
        i, j = flat // y.shape[1], flat % y.shape[1]
        need, per_row = torch.unique_consecutive(i, return_counts=True)  # only flagged rows go to float64
        crow = torch.zeros(len(need) + 1, dtype=torch.int64, device=i.device)
        crow[1:] = per_row.cumsum(0)
        # c32 holds the rows exactly (bf16/fp16 in float32), so its float64 copy is the input
        c64 = self._buf("c64", (len(need), c32.shape[1]), torch.float64).copy_(c32[need])
        # sampled dense-dense matmul: float64 dot products at the flagged entries only, on a CSR
        # pattern built straight from the row-major indices (no COO round trip: 2.4x faster)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": noise on every fold
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, j, torch.zeros(len(j), dtype=c64.dtype, device=c64.device),
                                              (len(need), y.shape[1]))
            exact = torch.sparse.sampled_addmm(pattern, c64, self.rot64_cols, beta=0.0)
        y.view(-1)[flat] = exact.values().to(self.out_dtype).float()  # values in the pattern's (row-major) order


def _near_boundaries(y, tau, out_dtype, midpoints: bool, buf):
    """Entries of float32 `y` whose true value, within `tau`, may round to another `out_dtype`
    value than `y` does: more than half a unit away (always), or across a midpoint (`midpoints`).
    `buf(key, shape, dtype)` lends reusable workspaces (see _Fp32Rotation)."""
    import torch

    mant = 8 if out_dtype == torch.bfloat16 else 11  # significand bits incl. the implicit one
    # More than one unit off: the true value v has |v| >= |y| - tau, and the spacing at v is
    # > |v| * 2^-mant. If |y| > tau * (2^(mant+1) + 1), then tau < spacing(v) / 2: y and v lie
    # within half a spacing and round to the same or adjacent values (also across a power of two,
    # where the spacing below halves: v then rounds to that power, y to it or its neighbour). The
    # margin lives in tau (`_err_factor`); this test is exact, in one cheap pass.
    flag = torch.le(torch.abs(y, out=buf("abs", y.shape, y.dtype)), tau * (2.0 ** (mant + 1) + 1),
                    out=buf("flag", y.shape, torch.bool))
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
