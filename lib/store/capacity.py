"""How much disk and GPU time a capture takes, computed from the shard format (lib.store.shards):
one safetensors file per sample = 8-byte header length + JSON header (tensor names, dtypes,
shapes, offsets and the string metadata, space-padded to a multiple of 8) + the tensors:

    input_ids [T] int64            8 B per token
    act/<hook> [T, d] per hook     d · itemsize B per token per hooked layer (bf16: 2d)
    logits [T, V] (optional)       V · itemsize B per token

`shard_size` is exact (it builds the same header the writer builds); `estimate` scales it to a
corpus and adds a forward-pass time from FLOPs at a stated fraction of a stated peak — an
estimate, not a measurement. tests/bench/capacity.py prints the README's capacity table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lib.core.dtypes import ITEMSIZE
from lib.store.safetensors_io import header_bytes
from lib.store.shards import ACT_PREFIX

ST_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # capture dtype → safetensors code


def shard_size(n_tokens: int, hooks: Mapping[str, int], dtype: str, vocab: int | None = None,
               metadata: Mapping[str, str] | None = None) -> int:
    """Bytes of one shard of `n_tokens` tokens: act/<hook> [T, d] for each (hook, d), logits
    [T, vocab] when `vocab` is given, input_ids [T] int64, and `metadata` in the header."""
    code = ST_CODE[dtype]
    shapes = {"input_ids": ("I64", (n_tokens,)), **{ACT_PREFIX + h: (code, (n_tokens, d)) for h, d in hooks.items()}}
    if vocab is not None:
        shapes["logits"] = (code, (n_tokens, vocab))
    layout = [(name, c, shape) for name, (c, shape) in sorted(shapes.items())]  # the writer's name order
    data = sum(math.prod(shape) * ITEMSIZE[c] for _, c, shape in layout)
    return len(header_bytes(layout, metadata)) + data


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only model's shape (Qwen3 / Llama layout: GQA attention, gated MLP, untied head)."""

    name: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def block_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    def forward_flops_per_token(self, logits: bool, seq_len: int) -> float:
        """2 FLOPs per weight per token for every block (+ lm_head only when logits are captured:
        the capture skips it otherwise), plus causal attention scores and values (≈ 2·2·T/2·H·hd
        per layer per token; small next to the weights at T ≈ 100)."""
        flops = 2.0 * self.layers * self.block_params + 2.0 * self.layers * seq_len * self.heads * self.head_dim
        return flops + (2.0 * self.hidden * self.vocab if logits else 0.0)


# Qwen3-8B / Qwen3-32B config.json shapes (hidden, layers, vocab, intermediate, q heads, kv heads, head_dim)
QWEN3_8B = ModelShape("Qwen3-8B", 4096, 36, 151936, 12288, 32, 8, 128)
QWEN3_32B = ModelShape("Qwen3-32B", 5120, 64, 151936, 25600, 64, 8, 128)


@dataclass(frozen=True)
class Estimate:
    model: str
    samples: int
    logits: bool
    bytes_per_token_per_layer: int
    bytes_per_token: int
    disk_bytes: int
    gpu_seconds: float  # forward passes only, from FLOPs (an estimate)
    write_seconds: float  # disk_bytes at the assumed write bandwidth


def estimate(shape: ModelShape, samples: int, mean_tokens: float, logits: bool, *, dtype: str = "bfloat16",
             metadata: Mapping[str, str] | None = None, peak_flops: float = 989e12, utilisation: float = 0.4,
             write_bytes_per_s: float = 2e9) -> Estimate:
    """Disk and time for capturing every decoder block (`shape.layers` hooks) of `samples`
    samples of `mean_tokens` tokens each. Disk: `shard_size` per sample (the header with
    `metadata`, e.g. a real shard's, so the text and ids are counted); metadata.jsonl rows are
    not included. GPU: FLOPs at `utilisation` × `peak_flops` (default 40 % of
    989 TFLOP/s, the dense bf16 peak of an H100/H200 SXM)."""
    t = max(1, round(mean_tokens))
    hooks = {f"model.layers.{i}": shape.hidden for i in range(shape.layers)}
    per_shard = shard_size(t, hooks, dtype, shape.vocab if logits else None, metadata)
    item = ITEMSIZE[ST_CODE[dtype]]
    per_token = 8 + shape.layers * shape.hidden * item + (shape.vocab * item if logits else 0)
    disk = samples * per_shard
    flops = samples * t * shape.forward_flops_per_token(logits, t)
    return Estimate(shape.name, samples, logits, shape.hidden * item, per_token, disk,
                    flops / (peak_flops * utilisation), disk / write_bytes_per_s)
