"""Streaming paired student/teacher rows out of shards, chunk by chunk, in float64.

`stream_pairs` reads each shard once, tensor by tensor (lib.store.safetensors_io reads only the
named tensors' rows), casts the kept rows straight into float64 chunk buffers of a bounded size and
hands each full chunk to the accumulators (lib.transport.stats, lib.transport.permutations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lib.core.errors import BadInputError
from lib.store.safetensors_io import read_rows

CHUNK_BYTES = 32 << 20  # per pair of float64 chunk buffers: big enough for efficient GEMMs


@dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of one paired sample: the same positions in both shards."""

    student_shard: str
    teacher_shard: str
    start: int
    stop: int


def chunk_rows_for(width: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per float64 chunk buffer of `width` columns (at least 256, at most 8192)."""
    return int(min(8192, max(256, chunk_bytes // (8 * max(width, 1)))))


def _read_rows(path: str, names: Sequence[str], start: int, stop: int) -> list[np.ndarray]:
    """Rows [start, stop) of each named tensor of one shard, in the stored dtype (numpy; bf16 → f32)."""
    out = []
    for t in read_rows(path, names, start, stop, framework="pt"):
        if t.dtype.is_floating_point and t.dtype.itemsize < 4:
            t = t.float()  # numpy has no bfloat16
        out.append(t.numpy())
    return out


def stream_pairs(spans: Iterable[RowSpan], tensors: Sequence[tuple[str, str, int, int]],
                 sinks: Sequence[Callable[[np.ndarray, np.ndarray], None]],
                 chunk_rows: int | None = None) -> int:
    """Stream paired rows of several tensors through `sinks`, reading each shard once.

    tensors: one (student tensor name, teacher tensor name, d_x, d_y) per sink; each sink is
    called as sink(x [m, d_x] float64, y [m, d_y] float64) with m ≤ the chunk size. Returns the
    number of paired rows streamed. Memory: one pair of chunk buffers per tensor.
    """
    if len(tensors) != len(sinks):
        raise ValueError("one sink per tensor pair")
    rows = chunk_rows or min(chunk_rows_for(dx + dy) for _, _, dx, dy in tensors)
    bufs = [(np.empty((rows, dx)), np.empty((rows, dy))) for _, _, dx, dy in tensors]
    fill = 0
    total = 0

    def flush() -> None:
        nonlocal fill
        if fill:
            for (bx, by), sink in zip(bufs, sinks, strict=True):
                sink(bx[:fill], by[:fill])
        fill = 0

    s_names = [t[0] for t in tensors]
    t_names = [t[1] for t in tensors]
    for span in spans:
        m = span.stop - span.start
        if m <= 0:
            continue
        xs = _read_rows(span.student_shard, s_names, span.start, span.stop)
        ys = _read_rows(span.teacher_shard, t_names, span.start, span.stop)
        for spec, x, y in zip(tensors, xs, ys, strict=True):
            if x.shape != (m, spec[2]) or y.shape != (m, spec[3]):
                raise BadInputError(
                    f"{span.student_shard} / {span.teacher_shard}: {spec[0]} rows {span.start}:{span.stop} have shapes "
                    f"{list(x.shape)} / {list(y.shape)}, expected [{m}, {spec[2]}] / [{m}, {spec[3]}]; the shard does "
                    "not match its index row, recapture it")
        done = 0
        while done < m:
            take = min(m - done, rows - fill)
            for (bx, by), x, y in zip(bufs, xs, ys, strict=True):
                np.copyto(bx[fill:fill + take], x[done:done + take], casting="same_kind")
                np.copyto(by[fill:fill + take], y[done:done + take], casting="same_kind")
            fill += take
            done += take
            if fill == rows:
                flush()
        total += m
    flush()
    return total
