"""P5: `validate` throughput vs raw hashlib.sha256 over the same files (warm page cache), like
with like: our 1-thread validation against a 1-thread hashlib loop (the overhead of reading the
index, stat'ing and comparing), and our N-thread validation against N hashlib threads (how well
the parallel path uses the cores). Both ratios are printed; >= 0.9 is the target for each.

Run: .venv/bin/python tests/bench/bench_validate.py [--files 64 --mib 8].
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--mib", type=int, default=8)
    a = ap.parse_args()
    import torch

    from lib.store.shards import commit_shards, make_payload_record, serialize_shard
    from lib.store.validation import validate_indexes

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_floats = a.mib * (1 << 20) // 4
        items = []
        for i in range(a.files):
            payload = serialize_shard({"act/x": torch.randn(n_floats // 256, 256)}, {"i": str(i)})
            items.append((make_payload_record(dict(
                shard=f"sample_{i:04d}.safetensors", sample_id=str(i), sample_index=i, text_sha256="0" * 64,
                token_start=0, token_end=1, n_tokens=1, truncated=False, layers=["x"], dtype="float32",
                shapes={"act/x": [n_floats // 256, 256]}, model="m", revision="r", tokenizer="t", backend="torch",
                capture_key=str(i), capture_version="1", logits=False), payload), payload))
        commit_shards(folder, items)
        files = sorted(folder.glob("sample_*.safetensors"))
        total = sum(f.stat().st_size for f in files)

        def hash_one(f: Path) -> str:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            return h.hexdigest()

        def raw(threads: int) -> float:
            t = time.perf_counter()
            if threads == 1:
                for f in files:
                    hash_one(f)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(hash_one, files))
            return time.perf_counter() - t

        def ours(threads: int) -> float:
            t = time.perf_counter()
            checks = validate_indexes([folder], workers=threads)
            assert all(c.ok for c in checks)
            return time.perf_counter() - t

        n = os.cpu_count() or 1
        raw(1); ours(1)  # warm the page cache
        gb = total / 1e9
        print(f"P5 validate: {len(files)} files, {gb:.2f} GB")
        for threads in sorted({1, n}):
            tr = min(raw(threads) for _ in range(3))
            to = min(ours(threads) for _ in range(3))
            print(f"  {threads} thread(s): hashlib {gb / tr:.2f} GB/s, validate {gb / to:.2f} GB/s "
                  f"→ ratio {tr / to:.2f} (validate / hashlib, same threads)")


if __name__ == "__main__":
    main()
