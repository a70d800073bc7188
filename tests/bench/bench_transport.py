"""Transports at corpus size: one layer's rotation solve streamed from bf16 shards on disk.

The issue's size is 2 million tokens x d=4096 (SliceGPT's calibration corpus): 16 GB of bf16 a
side (more than this machine's page cache, so the shards really come off the disk) and 67 TFLOP
of float64 XᵀY. `--tokens/--dim` scale it down for a quick look (the disk is checked first).
Shards are written once with the project's shard writer (lib.testing.synthetic →
lib.store.shards.commit_shards). Every job runs in a fresh subprocess. Figures, each against a
limit measured in the same run:

  read    the transport's shard reader (lib.transport.stream.read_spans: the read-ahead thread's
          preads, every span of the plan) vs `cat` of the same shard files, each scanning every
          file once from a cold page cache (dropped first where root may): goal ≥ 0.8. Also shown: the reader plus the one bf16 →
          float64 cast into the chunk buffers (stream_pairs with no-op sinks), which writes 4x
          the bytes it reads.
  solve   the whole solve (plan + stream into float64 moments + polar + pooled Q + files) vs a
          bare float64 XᵀY accumulation (acc += xᵀy through the same chunk size, from memory).
          The bare loop's GEMM rate is the same for every chunk, so it is timed over
          `--bare-tokens` and scaled to the token count (said in the output): goal ≤ 1.2.
  memory  the solve's working set (peak RSS above the post-import level) at --small vs --tokens
          tokens: flat, ≈ 1.

    PYTHONPATH=. .venv/bin/python tests/bench/bench_transport.py               # the issue's size, ≈ 40 min on 2 cores
    PYTHONPATH=. .venv/bin/python tests/bench/bench_transport.py --tokens 131072 --small 32768   # ≈ 5 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_rotate import LAYER, RssSampler, our_solve, shard_pairs  # noqa: E402

SAMPLE_TOKENS = 512


def write_data(folder: Path, n_tokens: int, d: int, seed: int = 0) -> None:
    """Paired bf16 samples y = x·P·S + noise, P a permutation and S random signs: an orthogonal
    map whose Procrustes solution is known, at no GEMM cost to write (a dense rotation would cost
    as much float32 work as the solve itself)."""
    import torch

    from lib.testing.synthetic import SyntheticSample, write_capture_from_arrays

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d, generator=g)
    sign = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
    batch = 16
    n_samples = n_tokens // SAMPLE_TOKENS
    for first in range(0, n_samples, batch):
        s_b, t_b = [], []
        for i in range(first, min(first + batch, n_samples)):
            x = torch.randn(SAMPLE_TOKENS, d, generator=g)
            y = x[:, perm] * sign + 0.3 * torch.randn(SAMPLE_TOKENS, d, generator=g)
            ids = torch.randint(0, 32000, (SAMPLE_TOKENS,), generator=g)
            s_b.append(SyntheticSample(f"sample {i}", ids, {LAYER: x}))
            t_b.append(SyntheticSample(f"sample {i}", ids, {LAYER: y}))
        kw = dict(first_index=first, token_start=first * SAMPLE_TOKENS, dtype="bfloat16")
        write_capture_from_arrays(folder / "student", s_b, **kw)
        write_capture_from_arrays(folder / "teacher", t_b, **kw)


def _indexes(data: Path) -> tuple[Path, Path]:
    return data / "student" / "metadata.jsonl", data / "teacher" / "metadata.jsonl"


def _plan(data: Path, out: Path):
    from lib.transport.options import RotateOptions
    from lib.transport.plan import plan_rotation

    return plan_rotation(*_indexes(data), [LAYER], out, options=RotateOptions())


def drop_page_cache() -> bool:
    """Write back and drop the page cache (needs root); False where the machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker(mode: str, data: Path, d: int, bare_tokens: int) -> dict:
    import numpy as np
    import torch  # noqa: F401  (imports first: RSS and times measure the work only)

    import lib.transport.solve  # noqa: F401
    from lib.transport.stream import chunk_rows_for, read_spans, stream_pairs

    files = [p for pair in shard_pairs(*_indexes(data)) for p in pair]
    with tempfile.TemporaryDirectory() as tmp:
        plan = _plan(data, Path(tmp) / "rot")
        name = "act/" + LAYER
        if mode == "read":
            nbytes = sum(f.stat().st_size for f in files)
            # Each scan reads every file once, from a cold page cache where this machine lets us
            # drop it (root), so all three come off the disk; otherwise in the same order one
            # after the other (on a data set larger than memory, mostly from the disk too).
            cold = drop_page_cache()
            cat = _timed(lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True))
            drop_page_cache()
            read = _timed(lambda: [None for _ in read_spans(plan.spans, [name], [name])])
            drop_page_cache()
            cast = _timed(lambda: stream_pairs(plan.spans, [(name, name, d, d)], [lambda x, y: None]))
            return {"cat": cat, "read": read, "cast": cast, "bytes": nbytes, "cold": cold}
        if mode == "bare":
            rows = chunk_rows_for(2 * d)
            bx, by = np.random.default_rng(0).standard_normal((2, rows, d))
            acc = np.zeros((d, d))
            n_chunks = -(-min(bare_tokens, plan.n_tokens) // rows)
            t = time.perf_counter()
            for _ in range(n_chunks):
                acc += bx.T @ by
            spent = time.perf_counter() - t
            return {"bare_measured": spent, "bare_tokens": n_chunks * rows,
                    "bare": spent * plan.n_tokens / (n_chunks * rows), "chunk_rows": rows}
        with RssSampler() as rss:
            t = time.perf_counter()
            res = our_solve(*_indexes(data), Path(tmp) / "solve")
            spent = time.perf_counter() - t
        return {"solve": spent, "work_mb": rss.delta_mb, "n_tokens": plan.n_tokens, **res}


def run_worker(mode: str, data: Path, d: int, bare_tokens: int = 0) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", mode, "--data", str(data), "--dim", str(d),
                          "--bare-tokens", str(bare_tokens)], capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"worker {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--small", type=int, default=262_144, help="the second token count (memory)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--bare-tokens", type=int, default=262_144,
                    help="tokens the bare XᵀY loop is timed over (scaled to --tokens; its rate is constant)")
    ap.add_argument("--workdir", default=None, help="where the shards go (default: a temp folder)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.data), a.dim, a.bare_tokens)))
        return
    need = 2 * 2 * (a.tokens + a.small) * a.dim * 1.01  # bf16, student + teacher, both sets
    free = shutil.disk_usage(a.workdir or tempfile.gettempdir()).free
    if need > 0.8 * free:
        raise SystemExit(f"{need / 1e9:.1f} GB of shards needed, {free / 1e9:.1f} GB free: pass smaller --tokens/--small")
    with tempfile.TemporaryDirectory(prefix="bench-transport-", dir=a.workdir) as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        t0 = time.perf_counter()
        write_data(big, a.tokens, a.dim)
        write_data(small, a.small, a.dim, seed=1)
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        print(f"data: {a.tokens} + {a.small} tokens x d={a.dim}, bf16, {SAMPLE_TOKENS} tokens a shard, "
              f"{need / 1.01 / 1e9:.2f} GB, written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPU(s), "
              f"{mem_gb:.0f} GB memory, load average {os.getloadavg()[0]:.1f}", flush=True)
        rd = run_worker("read", big, a.dim)
        gb = rd["bytes"] / 1e9
        print(f"read:   ({'cold page cache before each scan' if rd['cold'] else 'page cache not droppable here'}) "
              f"shard reader {rd['read']:.2f} s ({gb / rd['read']:.2f} GB/s) vs cat {rd['cat']:.2f} s "
              f"({gb / rd['cat']:.2f} GB/s) of the same {gb:.2f} GB → speed ratio {rd['cat'] / rd['read']:.2f} (goal ≥ 0.8)")
        print(f"        reader + bf16 → float64 cast {rd['cast']:.2f} s ({gb / rd['cast']:.2f} GB/s read, "
              f"{4 * gb / rd['cast']:.2f} GB/s of float64 written) → {rd['cat'] / rd['cast']:.2f} of cat", flush=True)
        bare = run_worker("bare", big, a.dim, a.bare_tokens)
        sv = run_worker("solve", big, a.dim)
        print(f"solve:  {sv['solve']:.1f} s for {sv['n_tokens']} tokens (plan {sv['plan_s']:.1f} s, stream + polar + pool "
              f"{sv['solve_s']:.1f} s) vs bare float64 XᵀY {bare['bare']:.1f} s ({bare['chunk_rows']}-row chunks; "
              f"timed over {bare['bare_tokens']} tokens in {bare['bare_measured']:.1f} s, scaled) → ratio "
              f"{sv['solve'] / bare['bare']:.3f} (goal ≤ 1.2); cosine after {sv['cos_after']:.4f} over {sv['n_cos']} tokens",
              flush=True)
        sm = run_worker("solve", small, a.dim)
        print(f"memory: solve working set {sm['work_mb']:.0f} MB at {sm['n_tokens']} tokens vs {sv['work_mb']:.0f} MB at "
              f"{sv['n_tokens']} → ratio {sv['work_mb'] / sm['work_mb']:.2f} (flat: ≈ 1)")


if __name__ == "__main__":
    main()
