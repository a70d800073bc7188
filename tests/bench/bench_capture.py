"""P1 + P2: capture overhead and memory. Run: .venv/bin/python tests/bench/bench_capture.py [--quick]

P1: the whole capture pipeline (hooks, copy, serialize, sha256, atomic write, index) over 64
    samples of a ~150M-param random Qwen3 in fp32, vs a bare forward of the same batches in the
    same process. Target <= 1.05 with logits (writes overlap the next forward on the background
    ShardWriter), < 1.0 with --no-logits (lm_head skipped). Also timed: the synchronous path
    (each batch committed before the next forward) and the disk-bandwidth limit: the capture's
    bytes written as one plain sequential file + fsync, in the same run.
P2: peak RSS of a capture of 256 vs 64 samples (child processes). Target <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build_model(out: Path, quick: bool) -> Path:
    from lib.testing.tiny_models import TinySpec, build_tiny_model, train_tokenizer

    tok = train_tokenizer(out / "tok", vocab_size=1024)
    spec = (TinySpec(family="qwen3", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                     intermediate_size=768) if quick else
            TinySpec(family="qwen3", hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=4, head_dim=64,
                     intermediate_size=2048, vocab_size=32768))
    return build_tiny_model(out / "model", spec, tokenizer_dir=tok)


def texts(n: int) -> list:
    from lib.store.corpus import Sample, load_texts

    base = load_texts()
    return [Sample(i, f"s{i}", base[i % len(base)].text + (f" ({i})" if i >= len(base) else "")) for i in range(n)]


def params_of(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():
            n += fh.get_slice(k).get_shape().numel() if hasattr(fh.get_slice(k).get_shape(), "numel") else \
                __import__("math").prod(fh.get_slice(k).get_shape())
    return n


def p1(model_dir: Path, work: Path, n: int, batch: int, reps: int = 3) -> None:
    import torch

    from lib.capture.plan import batches_by_length, plan_capture
    from lib.capture.run import capture_items, run_capture
    from lib.capture.spec import CaptureSpec
    from lib.capture.torch_backend import get_model

    samples = texts(n)
    for logits in (True, False):
        spec = CaptureSpec(model=str(model_dir), batch_size=batch, logits=logits, device="cpu")
        plan = plan_capture(spec, samples)
        lm = get_model(spec, plan)  # load once, outside both timings
        batches = batches_by_length(list(plan.items), batch)

        def bare() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    w = max(len(it.token_ids) for it in b)
                    ids = torch.full((len(b), w), lm.pad_id)
                    mask = torch.zeros((len(b), w), dtype=torch.long)
                    for i, it in enumerate(b):
                        ids[i, : len(it.token_ids)] = torch.tensor(it.token_ids)
                        mask[i, : len(it.token_ids)] = 1
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
            return time.perf_counter() - t

        def pipeline(k: int) -> float:
            out = work / f"p1-{logits}-{k}"
            t = time.perf_counter()
            run_capture(spec, samples, out)
            return time.perf_counter() - t

        def synchronous(k: int) -> float:  # the pre-writer path: commit, then the next forward
            out = work / f"p1s-{logits}-{k}"
            out.mkdir()
            t = time.perf_counter()
            for b in batches:
                capture_items(spec, plan, b, out)
            return time.perf_counter() - t

        def plain_write(nbytes: int) -> float:  # the disk's limit for the same bytes, same folder
            block = os.urandom(1 << 20)
            t = time.perf_counter()
            with open(work / "plain.bin", "wb") as fh:
                for _ in range(nbytes >> 20):
                    fh.write(block)
                fh.write(block[: nbytes & ((1 << 20) - 1)])
                fh.flush()
                os.fsync(fh.fileno())
            dt = time.perf_counter() - t
            os.unlink(work / "plain.bin")
            return dt

        bare()  # warm-up: first calls pay for lazy kernel/allocator set-up
        # interleave to share the machine's noise; take the best of `reps` each
        tb = tc = ts = tw = float("inf")
        for k in range(reps):
            tb = min(tb, bare())
            tc = min(tc, pipeline(k))
            ts = min(ts, synchronous(k))
            nbytes = sum(f.stat().st_size for f in (work / f"p1-{logits}-{k}").iterdir())
            tw = min(tw, plain_write(nbytes))
        tokens = sum(len(it.token_ids) for it in plan.items)
        print(f"P1 logits={'on ' if logits else 'off'}: bare forward (with logits) {tb:.2f}s, capture pipeline {tc:.2f}s "
              f"→ ratio {tc / tb:.3f}  (synchronous writes {ts:.2f}s → {ts / tb:.3f}; {tokens} tokens, {tokens / tc:.0f} tok/s)")
        print(f"   disk limit: {nbytes / 1e6:.0f} MB written; a plain sequential write+fsync of as many bytes {tw:.2f}s "
              f"({nbytes / tw / 1e6:.0f} MB/s) = {tw / tb:.3f}× the bare forward; capture − bare = {tc - tb:+.2f}s")


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from tests.bench.bench_capture import texts
t = time.perf_counter()
run_capture(CaptureSpec(model={model!r}, batch_size=8, device="cpu"), texts({n}), {out!r})
print(json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "s": time.perf_counter() - t}}))
"""


def p2(model_dir: Path, work: Path) -> None:
    res = {}
    for n in (64, 256):
        code = CHILD.format(root=str(ROOT), model=str(model_dir), n=n, out=str(work / f"p2-{n}"))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
    r = res[256]["maxrss_kb"] / res[64]["maxrss_kb"]
    print(f"P2 peak RSS: 64 samples {res[64]['maxrss_kb'] / 1024:.0f} MiB, 256 samples {res[256]['maxrss_kb'] / 1024:.0f} MiB "
          f"→ ratio {r:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~3M-param model instead of ~150M (smoke run)")
    ap.add_argument("--skip-p2", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per timing (the best is kept)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work, a.quick)
        print(f"model: {params_of(model_dir) / 1e6:.1f}M params, fp32, torch threads {__import__('torch').get_num_threads()}")
        p1(model_dir, work, 64, 8, a.reps)
        if not a.skip_p2:
            small = build_model(work / "small", True)
            p2(small, work)
    _ = os, resource


if __name__ == "__main__":
    main()
