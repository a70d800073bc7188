"""The demo teacher: a small Qwen3 (~3M params) briefly trained on the tour-stop corpus, so that
surprisal and logits mean something offline. Built once per recipe and cached on disk:

    python -m lib.demo_teacher            # prints the folder (builds it the first time, ~1 min)

Cache root: $TOURGUIDE_CACHE or ~/.cache/offline-tour-guide; the folder name is the recipe digest,
so changing any recipe field (or the corpus) builds a new teacher.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pydantic import Field

from lib.core.digests import sha256_file, sha256_json
from lib.core.options import Options
from lib.store.atomic import locked
from lib.store.corpus import SAMPLES_DIR, read_lines, sample_files


class DemoRecipe(Options):
    """The demo teacher's architecture and training run (its digest names the cache folder)."""

    label = "demo recipe"

    hidden_size: int = Field(192, ge=1, description="residual width")
    num_layers: int = Field(4, ge=1, description="decoder blocks")
    num_heads: int = Field(6, ge=1, description="query heads")
    num_kv_heads: int = Field(2, ge=1, description="key/value heads (GQA groups)")
    head_dim: int = Field(32, ge=1, description="width of one head")
    intermediate_size: int = Field(512, ge=1, description="MLP width")
    vocab_size: int = Field(1024, ge=1, description="tokenizer vocabulary (trained on the corpus)")
    steps: int = Field(120, ge=1, description="AdamW steps")
    batch_size: int = Field(16, ge=1, description="texts per step")
    max_length: int = Field(96, ge=2, description="tokens per training text")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (one-cycle schedule)")
    seed: int = Field(0, description="weights and batch sampling seed")
    tie_word_embeddings: bool = Field(False, description="tie lm_head to the embeddings")


# The demo model is tiny (~3M params, 16x96-token batches): its ops are too small to gain from
# intra-op threads, and with one thread per core it spins against every other busy process on
# the machine (measured: tests/bench/bench_demo_teacher.py, README "Demo timings").
TRAIN_THREADS = 1


def cache_root() -> Path:
    return Path(os.environ.get("TOURGUIDE_CACHE") or Path.home() / ".cache" / "offline-tour-guide")


def recipe_digest(recipe: DemoRecipe, samples_dir: str | os.PathLike = SAMPLES_DIR) -> str:
    corpus = [[f.name, sha256_file(f)] for f in sample_files(samples_dir)]
    return sha256_json({"recipe": recipe.model_dump(), "corpus": corpus, "v": 1})[:16]


def ensure_demo_teacher(recipe: DemoRecipe = DemoRecipe(), samples_dir: str | os.PathLike = SAMPLES_DIR,
                        log=print) -> Path:
    """The cached teacher folder for `recipe`, training it first if needed (under a lock, so two
    processes never train it twice)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"demo-teacher-{recipe_digest(recipe, samples_dir)}"
    if (final / "config.json").exists():
        return final
    with locked(root / ".demo-teacher.lock"):
        if (final / "config.json").exists():
            return final
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        train_demo_teacher(tmp, recipe, samples_dir, log)
        os.replace(tmp, final)
    return final


def train_demo_teacher(out_dir: Path, recipe: DemoRecipe, samples_dir: str | os.PathLike = SAMPLES_DIR,
                       log=print, threads: int | None = TRAIN_THREADS) -> Path:
    """Train a fresh Qwen3 of `recipe` for `recipe.steps` AdamW steps on the corpus (next-token
    loss, right-padded batches) and save model + tokenizer to `out_dir`. `threads`: torch
    intra-op threads while training (None: leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out_dir, recipe, samples_dir, log)
    finally:
        torch.set_num_threads(before)


def _train(out_dir: Path, recipe: DemoRecipe, samples_dir: str | os.PathLike, log) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.testing.tiny_models import TinySpec, make_config, train_tokenizer

    t0 = time.perf_counter()
    train_tokenizer(out_dir, vocab_size=recipe.vocab_size, samples_dir=samples_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    spec = TinySpec(family="qwen3", hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                    num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads, head_dim=recipe.head_dim,
                    intermediate_size=recipe.intermediate_size, tie_word_embeddings=recipe.tie_word_embeddings,
                    seed=recipe.seed)
    config = make_config(spec, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    texts = [t for f in sample_files(samples_dir) for _, t in read_lines(f)]
    seqs = [tok(t)["input_ids"][: recipe.max_length - 1] + [tok.eos_token_id] for t in texts]
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    model.train()
    for step in range(recipe.steps):
        pick = torch.randint(len(seqs), (recipe.batch_size,), generator=gen).tolist()
        batch = [seqs[i] for i in pick]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, s in enumerate(batch):
            ids[b, : len(s)] = torch.tensor(s)
            labels[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == recipe.steps - 1:
            log(f"demo teacher: step {step + 1}/{recipe.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
