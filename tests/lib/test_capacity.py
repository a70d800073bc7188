"""The capacity formula (lib.store.capacity) against the bytes of real shards written by a tiny
capture: the exact size from the tensor shapes + the shard's own header metadata must equal the
file size, for bf16 with logits and float32 without; a formula that forgets the logits or the
header must not (negative controls)."""

from __future__ import annotations

import pytest

from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.store.capacity import QWEN3_8B, QWEN3_32B, estimate, shard_size
from lib.store.corpus import Sample
from lib.store.safetensors_io import read_header
from lib.store.shards import read_index

TEXTS = ["The Sydney Opera House rises over Bennelong Point like a fleet of white sails.", "Bondi Beach.",
         "故宫是明清两代的皇家宫殿，红墙黄瓦，气势恢宏。"]


@pytest.mark.parametrize("dtype,logits", [("bfloat16", True), ("float32", False)])
def test_shard_size_equals_real_shard_bytes(make_tiny, tmp_path, dtype, logits):
    model = make_tiny("qwen3")
    hooks = ("model.layers.0", "model.layers.1")
    spec = CaptureSpec(model=str(model), hook_points=hooks, logits=logits, dtype=dtype, compute_dtype="float32",
                       device="cpu")
    run_capture(spec, [Sample(i, f"t:{i}", t) for i, t in enumerate(TEXTS)], tmp_path / "cap")
    rows = read_index(tmp_path / "cap")
    assert len(rows) == 3
    for row in rows:
        path = tmp_path / "cap" / row.shard
        meta = dict(read_header(path).metadata)
        vocab = row.shapes["logits"][1] if logits else None
        widths = {h: row.shapes["act/" + h][1] for h in hooks}
        size = path.stat().st_size
        assert shard_size(row.n_tokens, widths, dtype, vocab, meta) == size == row.bytes
        # negative controls: the logits and the header are real parts of the size
        if logits:
            assert shard_size(row.n_tokens, widths, dtype, None, meta) < size
        assert shard_size(row.n_tokens, widths, dtype, vocab, None) < size


def test_estimate_scales_per_token_and_per_sample():
    meta = {"text": "x" * 300, "sample_id": "generic_en.txt:1"}
    one = estimate(QWEN3_8B, 1, 100, logits=False, metadata=meta)
    assert one.bytes_per_token_per_layer == 2 * 4096 and one.bytes_per_token == 8 + 36 * 2 * 4096
    two = estimate(QWEN3_8B, 1, 200, logits=False, metadata=meta)
    assert abs((two.disk_bytes - one.disk_bytes) - 100 * one.bytes_per_token) <= 16  # header digits/padding only
    assert estimate(QWEN3_8B, 200, 100, False, metadata=meta).disk_bytes == 200 * one.disk_bytes
    with_logits = estimate(QWEN3_8B, 1, 100, logits=True, metadata=meta)
    assert with_logits.bytes_per_token - one.bytes_per_token == 2 * 151936
    # block weights from the shapes: 6.95 B (Qwen3-8B) and 31.2 B (Qwen3-32B) non-embedding parameters
    assert QWEN3_8B.layers * QWEN3_8B.block_params == pytest.approx(6.95e9, rel=0.005)
    assert QWEN3_32B.layers * QWEN3_32B.block_params == pytest.approx(31.2e9, rel=0.005)
