"""Capacity table for the README: disk and capture time for 200 and 10,000 samples of
Qwen3-8B- and Qwen3-32B-shaped models in bf16, every decoder block hooked, with and without
logits. Sizes come from the shard format (lib.store.capacity.shard_size, exact per shard; the
test tests/lib/test_capacity.py checks it against real shards). GPU times are ESTIMATES from
FLOPs at a stated fraction of the H100/H200 dense bf16 peak — nothing here runs on a GPU.

    PYTHONPATH=. .venv/bin/python tests/bench/capacity.py                       # token counts estimated
    PYTHONPATH=. .venv/bin/python tests/bench/capacity.py --tokenizer DIR       # counted with a local tokenizer
    … --max-length 64      (cap per sample, as `tourguide pipeline`'s default)

Token counts: with --tokenizer (a local Qwen tokenizer folder) the corpus (samples/*.txt) is
tokenized; without one (this machine has none offline) they are estimated as 1.3 tokens per
English word and 1 token per 1.5 CJK characters — say which in anything you quote.
"""

from __future__ import annotations

import argparse
import re
import statistics

from lib.capture.spec import CAPTURE_VERSION
from lib.store.capacity import QWEN3_8B, QWEN3_32B, estimate
from lib.store.corpus import SAMPLES_DIR, load_texts, sample_files
from lib.store.shards import LAYER_CONVENTION

CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def estimated_tokens(text: str) -> float:
    cjk = len(CJK.findall(text))
    words = len(CJK.sub(" ", text).split())
    return 1.3 * words + cjk / 1.5 + 1  # + 1: punctuation-only runs, rounding


def token_counts(tokenizer: str | None) -> tuple[list[int | float], str]:
    texts = [s.text for s in load_texts(text_files=[str(f) for f in sample_files(SAMPLES_DIR)])]
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        return [len(tok(t)["input_ids"]) for t in texts], f"tokenized with {tokenizer}"
    return [estimated_tokens(t) for t in texts], "estimated: 1.3 tokens/English word, 1 token/1.5 CJK characters"


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.3g} TB"


def seconds(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s / 60:.3g} min" if s < 7200 else f"{s / 3600:.3g} h"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="local tokenizer folder to count the corpus tokens with")
    ap.add_argument("--max-length", type=int, default=None, help="cap per sample (tokens)")
    ap.add_argument("--utilisation", type=float, default=0.4, help="fraction of peak FLOP/s assumed")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--write-gbps", type=float, default=2.0, help="sustained disk write, GB/s")
    args = ap.parse_args()
    counts, how = token_counts(args.tokenizer)
    if args.max_length:
        counts = [min(c, args.max_length) for c in counts]
    mean = statistics.fmean(counts)
    texts = [s.text for s in load_texts(text_files=[str(f) for f in sample_files(SAMPLES_DIR)])]
    mean_text = "x" * round(statistics.fmean(len(t.encode()) for t in texts))
    meta = {"sample_id": "generic_en.txt:100", "text": mean_text, "text_sha256": "0" * 64, "model": "Qwen/Qwen3-8B",
            "revision": "0" * 40, "tokenizer": "Qwen/Qwen3-8B", "dtype": "bfloat16",
            "layer_convention": LAYER_CONVENTION, "backend": "torch", "capture_key": "0" * 64,
            "capture_version": CAPTURE_VERSION, "truncated": "false", "compute_dtype": "bfloat16", "device": "cuda"}
    print(f"corpus: {len(counts)} samples, mean {mean:.1f} tokens/sample ({how}"
          + (f", capped at {args.max_length}" if args.max_length else "") + ")")
    print(f"GPU time: ESTIMATE = FLOPs / ({args.utilisation:.0%} × {args.peak_tflops:g} TFLOP/s bf16 dense, "
          f"H100/H200 SXM); forward passes only (no model load); write time at {args.write_gbps:g} GB/s\n")
    print("| model (bf16, all blocks hooked) | bytes/token/layer | logits | bytes/token | samples | disk "
          "| GPU time (est.) | write time |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in (QWEN3_8B, QWEN3_32B):
        for logits in (False, True):
            for n in (200, 10_000):
                e = estimate(shape, n, mean, logits, metadata=meta, peak_flops=args.peak_tflops * 1e12,
                             utilisation=args.utilisation, write_bytes_per_s=args.write_gbps * 1e9)
                print(f"| {shape.name} (d={shape.hidden}, {shape.layers} layers) | {e.bytes_per_token_per_layer:,} "
                      f"| {'yes' if logits else 'no'} | {e.bytes_per_token:,} | {n:,} | {human(e.disk_bytes)} "
                      f"| {seconds(e.gpu_seconds)} | {seconds(e.write_seconds)} |")


if __name__ == "__main__":
    main()
