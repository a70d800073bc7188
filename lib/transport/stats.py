"""Streaming float64 moments of paired student/teacher token rows, and the shard streamer.

`CrossMoments` holds, for rows x [d_x] (student) and y [d_y] (teacher) paired by sample and
position, in float64 whatever the shard dtype:

    n               tokens seen
    sum_x, sum_y    Σ x, Σ y                    (centred statistics: μ = Σ/n)
    sq_x, sq_y      Σ |x|², Σ |y|²              (= tr Sx, tr Sy: the Procrustes residual)
    cross           C = Σ xᵀ y        [d_x, d_y] (R = polar(C))
    gram_x, gram_y  Sx = Σ xᵀx, Sy = Σ yᵀy       (only with full=True: PCA needs them)
    cos_sum         Σ cos(x, y)                  (d_x == d_y: the mean cosine *before*, exact)
    cross_unit      Ĉ = Σ x̂ᵀŷ, x̂ = x/|x|        (over every `cosine_stride`-th token: the mean
                                                  cosine under any orthogonal R is tr(Rᵀ Ĉ)/n_unit)

Memory is O(d²) whatever the token count. Cost per token: one d_x·d_y GEMM row for C, plus
O(d) for the rest; the full grams cost about one more GEMM (so they are only accumulated when
PCA asks for them), and Ĉ costs a GEMM row only on its sampled tokens (`cosine_stride`).

`stream_pairs` reads the shards of a paired plan once, tensor by tensor (safetensors reads
only the named tensors), casts the kept rows straight into float64 chunk buffers of a bounded
size and hands each full chunk to the accumulators.

Run the tests: `.venv/bin/python -m pytest tests/lib/test_transport_stats.py -q`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.store.safetensors_io import load_tensors, save_tensors

STATS_VERSION = "1"

UNIT_ROWS = 256  # sampled unit rows gathered before one GEMM into Ĉ (memory: 256·(d_x+d_y) floats)


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


class CrossMoments:
    """Running float64 moments of paired rows; see the module docstring for each field."""

    def __init__(self, d_x: int, d_y: int, *, full: bool = False, cosine_stride: int = 1) -> None:
        if cosine_stride < 0:
            raise BadInputError(f"cosine_stride must be >= 0 (0 = no sampled cosine), got {cosine_stride}")
        self.d_x, self.d_y, self.full, self.cosine_stride = int(d_x), int(d_y), bool(full), int(cosine_stride)
        self.n = 0
        self.sum_x, self.sum_y = np.zeros(d_x), np.zeros(d_y)
        self.sq_x = self.sq_y = 0.0
        self.cross = np.zeros((d_x, d_y))
        self.gram_x = np.zeros((d_x, d_x)) if full else None
        self.gram_y = np.zeros((d_y, d_y)) if full else None
        self._scratch: np.ndarray | None = None  # [d_x, d_y] per-chunk product, reused
        self.cos_sum = 0.0
        self.n_zero = 0  # rows where |x| or |y| is 0 (their cosine counts as 0)
        self._cross_unit = np.zeros((d_x, d_y)) if cosine_stride else None
        self._unit_rows: list[tuple[np.ndarray, np.ndarray]] = []  # sampled unit rows not yet in Ĉ
        self.n_unit = 0
        self._n_pending = 0

    @property
    def cross_unit(self) -> np.ndarray | None:
        """Ĉ, with every sampled row added (see `_flush_unit`)."""
        self._flush_unit()
        return self._cross_unit

    @cross_unit.setter
    def cross_unit(self, value: np.ndarray | None) -> None:
        self._unit_rows, self._n_pending = [], 0
        self._cross_unit = value

    def _flush_unit(self) -> None:
        """Add the pending sampled rows to Ĉ in one GEMM. Any product into Ĉ touches all d_x·d_y
        entries, so the few rows a chunk samples at a large stride wait until UNIT_ROWS are
        pending: per chunk, a d² pass would cost as much as ~15% of the chunk's own C GEMM."""
        if self._n_pending:
            ux = np.concatenate([a for a, _ in self._unit_rows])
            uy = np.concatenate([b for _, b in self._unit_rows])
            accumulate_product(self._cross_unit, ux, uy, self._scratch)
            self._unit_rows, self._n_pending = [], 0

    @property
    def same_width(self) -> bool:
        return self.d_x == self.d_y

    def update(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add rows x [T, d_x], y [T, d_y] (any float dtype; rows paired by index). `mask` [T]
        bool keeps only the True rows: padded positions never enter any statistic."""
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.d_x or y.shape[1] != self.d_y:
            raise BadInputError(f"paired rows must be [T, {self.d_x}] and [T, {self.d_y}], got {list(x.shape)} and {list(y.shape)}")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (x.shape[0],):
                raise BadInputError(f"mask must be [T]={x.shape[0]} booleans, got {list(mask.shape)}")
            x, y = x[mask], y[mask]
        if x.dtype != np.float64:
            x = x.astype(np.float64)
        if y.dtype != np.float64:
            y = y.astype(np.float64)
        t = x.shape[0]
        if t == 0:
            return
        if self._scratch is None:
            self._scratch = np.empty((self.d_x, self.d_y))
        accumulate_product(self.cross, x, y, self._scratch)
        if self.full:
            accumulate_product(self.gram_x, x, x)  # numpy picks dsyrk for xᵀx
            accumulate_product(self.gram_y, y, y)
        self.sum_x += x.sum(axis=0)
        self.sum_y += y.sum(axis=0)
        nx2 = np.einsum("ij,ij->i", x, x)
        ny2 = np.einsum("ij,ij->i", y, y)
        self.sq_x += float(nx2.sum())
        self.sq_y += float(ny2.sum())
        denom = np.sqrt(nx2 * ny2)
        zero = denom == 0
        self.n_zero += int(zero.sum())
        if self.same_width:
            dots = np.einsum("ij,ij->i", x, y)
            self.cos_sum += float(np.sum(np.divide(dots, denom, out=np.zeros(t), where=~zero)))
        if self._cross_unit is not None:
            # Sampled tokens: the running token index k is kept when k % stride == 0, so the
            # sample does not depend on how rows are chunked.
            first = (-self.n) % self.cosine_stride
            rows = np.arange(first, t, self.cosine_stride)
            if rows.size:
                nx = np.sqrt(nx2[rows])
                ny = np.sqrt(ny2[rows])
                nx[nx == 0] = np.inf  # a zero row contributes 0 to every cosine
                ny[ny == 0] = np.inf
                self._unit_rows.append((x[rows] / nx[:, None], y[rows] / ny[:, None]))  # fresh arrays
                self._n_pending += int(rows.size)
                self.n_unit += int(rows.size)
                if self._n_pending >= UNIT_ROWS:
                    self._flush_unit()
        self.n += t

    def merge(self, other: CrossMoments) -> None:
        """Add another accumulator's sums (same widths/options; the sampled cosine stays exact
        only if the other one's token count is a multiple of the stride)."""
        if (other.d_x, other.d_y, other.full, other.cosine_stride) != (self.d_x, self.d_y, self.full, self.cosine_stride):
            raise BadInputError("cannot merge moments with different widths or options")
        for name in ("sum_x", "sum_y", "cross", "gram_x", "gram_y", "cross_unit"):
            a = getattr(self, name)
            if a is not None:
                a += getattr(other, name)
        self.n += other.n
        self.sq_x += other.sq_x
        self.sq_y += other.sq_y
        self.cos_sum += other.cos_sum
        self.n_zero += other.n_zero
        self.n_unit += other.n_unit

    # --- derived -----------------------------------------------------------------------------
    @property
    def mean_x(self) -> np.ndarray:
        return self.sum_x / max(self.n, 1)

    @property
    def mean_y(self) -> np.ndarray:
        return self.sum_y / max(self.n, 1)

    @property
    def cosine_before(self) -> float | None:
        """Mean token cosine of x vs y over every token (None when the widths differ)."""
        return self.cos_sum / self.n if self.same_width and self.n else None

    # --- on disk -----------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, np.ndarray]:
        out = {"n": np.array([self.n], np.int64), "n_zero": np.array([self.n_zero], np.int64),
               "n_unit": np.array([self.n_unit], np.int64), "sum_x": self.sum_x, "sum_y": self.sum_y,
               "sq_x": np.array([self.sq_x]), "sq_y": np.array([self.sq_y]), "cos_sum": np.array([self.cos_sum]),
               "cross": self.cross}
        for name in ("gram_x", "gram_y", "cross_unit"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def metadata(self) -> dict[str, str]:
        return {"stats_version": STATS_VERSION, "d_x": str(self.d_x), "d_y": str(self.d_y), "full": str(self.full),
                "cosine_stride": str(self.cosine_stride)}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], meta: dict[str, str]) -> CrossMoments:
        m = cls(int(meta["d_x"]), int(meta["d_y"]), full=meta["full"] == "True", cosine_stride=int(meta["cosine_stride"]))
        m.n, m.n_zero, m.n_unit = int(t["n"][0]), int(t["n_zero"][0]), int(t["n_unit"][0])
        m.sq_x, m.sq_y, m.cos_sum = float(t["sq_x"][0]), float(t["sq_y"][0]), float(t["cos_sum"][0])
        m.sum_x, m.sum_y, m.cross = _f64(t["sum_x"]), _f64(t["sum_y"]), _f64(t["cross"])
        for name in ("gram_x", "gram_y", "cross_unit"):
            if name in t:
                setattr(m, name, _f64(t[name]))
        return m

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
        return save_tensors(path, self.to_tensors(), {**self.metadata(), **(extra_metadata or {})})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CrossMoments:
        tensors, meta = load_tensors(path)
        if meta.get("stats_version") != STATS_VERSION:
            raise BadInputError(f"{path}: stats version {meta.get('stats_version')!r} is not {STATS_VERSION}; re-run `tourguide rotate`")
        return cls.from_tensors(tensors, meta)


def accumulate_product(acc: np.ndarray, a: np.ndarray, b: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """acc [m, n] += aᵀ b for a [T, m], b [T, n] float64, through numpy's BLAS (the same library
    as everything else here: two OpenBLAS thread pools would spin against each other). When
    `a is b`, numpy runs dsyrk (half the flops). `scratch` [m, n] float64 avoids a d² allocation."""
    if scratch is None or scratch.shape != acc.shape:
        acc += a.T @ b
    else:
        np.matmul(a.T, b, out=scratch)
        acc += scratch
