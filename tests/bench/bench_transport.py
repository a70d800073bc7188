"""Transports at corpus size: one layer's rotation solve streamed from bf16 shards on disk.

The issue's size is 2 million tokens x d=4096 (SliceGPT's calibration corpus): 16 GB of bf16 a
side and 67 TFLOP of float64 XᵀY. `--tokens/--dim` scale it to the machine (the disk is checked
first). Shards are written once with the project's shard writer (lib.testing.synthetic →
lib.store.shards.commit_shards). Figures, each against a limit measured in the same run, every
job in a fresh subprocess, on a warm page cache, best of --repeat:

  read    lib.transport.stream.stream_pairs with no-op sinks (read-ahead thread, one bf16 →
          float64 cast into the chunk buffers) vs `cat` of the same shard files: goal ≥ 0.8
  stream  stream_pairs into CrossMoments (the solve's token loop) vs a bare float64 XᵀY
          accumulation over as many tokens through the same chunk size, from memory: goal ≤ 1.2
  solve   the whole solve (plan + stream + polar + pooled Q + files) vs the same bare loop; its
          d x d SVD does not grow with the token count, so at scaled-down sizes it weighs more
  memory  the solve's working set (peak RSS above the post-import level) at --small vs --tokens

    PYTHONPATH=. .venv/bin/python tests/bench/bench_transport.py [--tokens 2000000 --small 1000000 --dim 4096]
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
    import torch

    from lib.testing.synthetic import SyntheticSample, write_capture_from_arrays

    g = torch.Generator().manual_seed(seed)
    r = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    batch = 16
    n_samples = n_tokens // SAMPLE_TOKENS
    for first in range(0, n_samples, batch):
        s_b, t_b = [], []
        for i in range(first, min(first + batch, n_samples)):
            x = torch.randn(SAMPLE_TOKENS, d, generator=g)
            y = x @ r + 0.3 * torch.randn(SAMPLE_TOKENS, d, generator=g)
            ids = torch.randint(0, 32000, (SAMPLE_TOKENS,), generator=g)
            s_b.append(SyntheticSample(f"sample {i}", ids, {LAYER: x}))
            t_b.append(SyntheticSample(f"sample {i}", ids, {LAYER: y}))
        kw = dict(first_index=first, token_start=first * SAMPLE_TOKENS, dtype="bfloat16")
        write_capture_from_arrays(folder / "student", s_b, **kw)
        write_capture_from_arrays(folder / "teacher", t_b, **kw)


def _plan(data: Path, out: Path):
    from lib.transport.options import RotateOptions
    from lib.transport.plan import plan_rotation

    return plan_rotation(data / "student" / "metadata.jsonl", data / "teacher" / "metadata.jsonl", [LAYER], out,
                         options=RotateOptions())


def worker(mode: str, data: Path, d: int, repeat: int) -> dict:
    import numpy as np

    import lib.transport.solve  # noqa: F401  (imports first: RSS and times measure the work only)
    from lib.transport.stats import CrossMoments
    from lib.transport.stream import chunk_rows_for, stream_pairs

    files = [p for pair in shard_pairs(data / "student" / "metadata.jsonl", data / "teacher" / "metadata.jsonl")
             for p in pair]
    nbytes = sum(f.stat().st_size for f in files)
    tensors = [("act/" + LAYER, "act/" + LAYER, d, d)]
    rows = chunk_rows_for(2 * d)
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    with tempfile.TemporaryDirectory() as tmp:
        plan = _plan(data, Path(tmp) / "rot")
        if mode == "memory":
            with RssSampler() as rss:
                our_solve(data / "student" / "metadata.jsonl", data / "teacher" / "metadata.jsonl", Path(tmp) / "r2")
            return {"work_mb": rss.delta_mb, "n_tokens": plan.n_tokens}
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        bx, by = np.random.default_rng(0).standard_normal((2, rows, d))
        for k in range(repeat):
            t = time.perf_counter()
            subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
            keep("cat", time.perf_counter() - t)
            t = time.perf_counter()
            stream_pairs(plan.spans, tensors, [lambda x, y: None], plan.options.chunk_rows)
            keep("read", time.perf_counter() - t)
            acc = np.zeros((d, d))
            t = time.perf_counter()
            for _ in range(-(-plan.n_tokens // rows)):
                acc += bx.T @ by
            keep("bare", time.perf_counter() - t)
            moments = CrossMoments(d, d, cosine_stride=plan.cosine_stride)
            t = time.perf_counter()
            stream_pairs(plan.spans, tensors, [moments.update], plan.options.chunk_rows)
            keep("stream", time.perf_counter() - t)
            t = time.perf_counter()
            our_solve(data / "student" / "metadata.jsonl", data / "teacher" / "metadata.jsonl", Path(tmp) / f"s{k}")
            keep("solve", time.perf_counter() - t)
    return {**best, "bytes": nbytes, "n_tokens": plan.n_tokens, "chunk_rows": rows}


def run_worker(mode: str, data: Path, d: int, repeat: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", mode, "--data", str(data), "--dim", str(d),
                          "--repeat", str(repeat)], capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"worker {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--small", type=int, default=1_000_000, help="the second token count (memory)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the shards go (default: a temp folder)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.data), a.dim, a.repeat)))
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
        print(f"data: {a.tokens} + {a.small} tokens x d={a.dim}, bf16, {SAMPLE_TOKENS} tokens a shard, "
              f"{need / 1.01 / 1e9:.2f} GB, written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPU(s), "
              f"load average {os.getloadavg()[0]:.1f}")
        tm = run_worker("time", big, a.dim, a.repeat)
        gb = tm["bytes"] / 1e9
        print(f"read:   stream_pairs {tm['read']:.2f} s ({gb / tm['read']:.2f} GB/s) vs cat {tm['cat']:.2f} s "
              f"({gb / tm['cat']:.2f} GB/s) → speed ratio {tm['cat'] / tm['read']:.2f} (goal ≥ 0.8)")
        print(f"stream: stream_pairs → CrossMoments {tm['stream']:.2f} s vs bare float64 XᵀY over {tm['n_tokens']} tokens "
              f"({tm['chunk_rows']}-row chunks) {tm['bare']:.2f} s → ratio {tm['stream'] / tm['bare']:.2f} (goal ≤ 1.2)")
        print(f"solve:  plan + stream + polar + pool + files {tm['solve']:.2f} s → ratio {tm['solve'] / tm['bare']:.2f} "
              f"(the d×d SVD is fixed cost; it shrinks relative to the token loop as tokens grow)")
        m_small, m_big = run_worker("memory", small, a.dim, 1), run_worker("memory", big, a.dim, 1)
        print(f"memory: solve working set {m_small['work_mb']:.0f} MB at {m_small['n_tokens']} tokens vs "
              f"{m_big['work_mb']:.0f} MB at {m_big['n_tokens']} → ratio {m_big['work_mb'] / m_small['work_mb']:.2f} (flat: ≈ 1)")


if __name__ == "__main__":
    main()
