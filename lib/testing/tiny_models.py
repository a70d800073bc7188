"""Tiny random Qwen3 / Qwen2 / Llama models and a byte-level BPE tokenizer, built offline.

Everything is deterministic from a seed and saved as a normal HF folder (`save_pretrained`),
so tests and the demo exercise the real `from_pretrained` loading path. Run it:

    python -m lib.tiny_models /tmp/tiny-qwen3 --family qwen3
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from lib.store.corpus import SAMPLES_DIR, read_lines, sample_files

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024,
                    samples_dir: str | os.PathLike = SAMPLES_DIR) -> Path:
    """Train a byte-level BPE on the project's samples and save it as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [t for f in sample_files(samples_dir) for _, t in read_lines(f)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. head_dim >= 32 (vLLM's CPU backend rejects 16)."""

    family: str = "qwen3"  # qwen3 | qwen2 | llama
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512
    seed: int = 0
    vocab_size: int | None = None  # None: the tokenizer's size; larger pads the embedding (benchmarks)


def make_config(spec: TinySpec, vocab_size: int, pad_token_id: int, eos_token_id: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=1e-6, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, bos_token_id=eos_token_id,
    )
    if spec.family == "qwen3":
        return Qwen3Config(head_dim=spec.head_dim, **common)
    if spec.family == "llama":
        return LlamaConfig(head_dim=spec.head_dim, **common)
    if spec.family == "qwen2":
        if spec.hidden_size != spec.num_heads * spec.head_dim:
            raise ValueError("Qwen2 derives head_dim = hidden_size // num_heads; make them agree")
        return Qwen2Config(**common)
    raise ValueError(f"unknown family {spec.family!r}; use qwen3, qwen2 or llama")


def randomize_extras(model, seed: int) -> None:
    """Give norms non-trivial gains and biases non-zero values: a fold that forgets to move a
    gain, or a permutation that forgets a bias, must change the function."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def build_tiny_model(out_dir: str | os.PathLike, spec: TinySpec = TinySpec(),
                     tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Build a random model of `spec` with the project's tokenizer and save both to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = train_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = make_config(spec, vocab_size=max(len(tok), spec.vocab_size or 0), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_extras(model, spec.seed)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build a tiny random HF model folder (offline).")
    ap.add_argument("out_dir")
    ap.add_argument("--family", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    ap.add_argument("--tie", action="store_true", help="tie lm_head to embed_tokens")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_tiny_model(a.out_dir, TinySpec(family=a.family, tie_word_embeddings=a.tie, seed=a.seed)))
