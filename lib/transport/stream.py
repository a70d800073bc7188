"""Streaming paired student/teacher rows out of shards, chunk by chunk, in float64.

`stream_pairs` reads each shard once, tensor by tensor (lib.store.safetensors_io reads only the
named tensors' rows), casts the kept rows straight into float64 chunk buffers of a bounded size and
hands each full chunk to the accumulators (lib.transport.stats, lib.transport.permutations).

Reading runs one span ahead on a background thread (`READ_AHEAD` spans queued: disk reads and
the float64 GEMMs overlap, since both release the GIL), and the stored rows (bf16/fp16/fp32)
are cast into the float64 buffers in one pass by torch, without an intermediate float32 copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.store.safetensors_io import read_rows

CHUNK_BYTES = 32 << 20  # per pair of float64 chunk buffers: big enough for efficient GEMMs


READ_AHEAD = 2  # spans read ahead of the accumulation: bounds memory to a few samples' rows


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


def read_spans(spans: Iterable[RowSpan], s_names: Sequence[str], t_names: Sequence[str],
               depth: int = READ_AHEAD) -> Iterator[tuple[RowSpan, list[Any], list[Any]]]:
    """(span, student rows, teacher rows) in span order, read `depth` spans ahead on a thread.
    A read error is re-raised here, in the consumer, at the span where it happened."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for span in spans:
                if stop.is_set():
                    return
                if span.stop <= span.start:
                    continue
                item = (span, read_rows(span.student_shard, s_names, span.start, span.stop, framework="pt"),
                        read_rows(span.teacher_shard, t_names, span.start, span.stop, framework="pt"))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    worker = threading.Thread(target=produce, name="transport-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (an error): let the reader exit
        worker.join()


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
    import torch

    rows = chunk_rows or min(chunk_rows_for(dx + dy) for _, _, dx, dy in tensors)
    bufs = [(np.empty((rows, dx)), np.empty((rows, dy))) for _, _, dx, dy in tensors]
    views = [(torch.from_numpy(bx), torch.from_numpy(by)) for bx, by in bufs]  # same memory as bufs
    # The casts are memory-bound: torch's intra-op threads only contend for the cores the GEMMs
    # (numpy's BLAS, unaffected) need — 5x slower measured on a loaded 2-core box. Restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = _stream(spans, tensors, bufs, views, rows, flush_to=sinks)
    finally:
        torch.set_num_threads(threads)
    return total


def _stream(spans, tensors, bufs, views, rows, flush_to) -> int:
    fill = total = 0

    def flush() -> None:
        nonlocal fill
        if fill:
            for (bx, by), sink in zip(bufs, flush_to, strict=True):
                sink(bx[:fill], by[:fill])
        fill = 0

    s_names = [t[0] for t in tensors]
    t_names = [t[1] for t in tensors]
    for span, xs, ys in read_spans(spans, s_names, t_names):
        m = span.stop - span.start
        for spec, x, y in zip(tensors, xs, ys, strict=True):
            if tuple(x.shape) != (m, spec[2]) or tuple(y.shape) != (m, spec[3]):
                raise BadInputError(
                    f"{span.student_shard} / {span.teacher_shard}: {spec[0]} rows {span.start}:{span.stop} have shapes "
                    f"{list(x.shape)} / {list(y.shape)}, expected [{m}, {spec[2]}] / [{m}, {spec[3]}]; the shard does "
                    "not match its index row, recapture it")
        done = 0
        while done < m:
            take = min(m - done, rows - fill)
            for (vx, vy), x, y in zip(views, xs, ys, strict=True):
                vx[fill:fill + take].copy_(x[done:done + take])  # the one cast, stored dtype → float64
                vy[fill:fill + take].copy_(y[done:done + take])
            fill += take
            done += take
            if fill == rows:
                flush()
        total += m
    flush()
    return total
