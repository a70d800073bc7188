"""Session fixtures: offline env, tiny models built once, one Prefect test harness.

Tiny models are real HF folders (config + safetensors + tokenizer) built from a seed, so every
test exercises the real `from_pretrained` path. The Prefect harness costs ~20 s to start on two
cores: only tests that run flows ask for `prefect_harness`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect/huggingface_hub: throwaway Prefect home, no telemetry, offline.
_HOME = Path(tempfile.mkdtemp(prefix="tourguide-tests-"))
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_HOME / "hf")
os.environ["TOURGUIDE_CACHE"] = str(_HOME / "cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from lib.testing.tiny_models import TinySpec, build_tiny_model, train_tokenizer

FAMILIES = ("qwen3", "qwen2", "llama")


@pytest.fixture(scope="session")
def work_root() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tokenizer_dir(work_root: Path) -> Path:
    return train_tokenizer(work_root / "tokenizer", vocab_size=512)


@pytest.fixture(scope="session")
def make_tiny(work_root: Path, tokenizer_dir: Path):
    """make_tiny(family='qwen3', tie=False, **TinySpec fields) -> model folder (built once per spec)."""
    built: dict[TinySpec, Path] = {}

    def make(family: str = "qwen3", tie: bool = False, **kw) -> Path:
        if family == "qwen2":
            kw.setdefault("hidden_size", kw.get("num_heads", 4) * kw.get("head_dim", 32))
        spec = TinySpec(family=family, tie_word_embeddings=tie, **kw)
        if spec not in built:
            name = f"{family}-{'tied' if tie else 'untied'}-{abs(hash(spec)) % 10**8}"
            built[spec] = build_tiny_model(work_root / "models" / name, spec, tokenizer_dir=tokenizer_dir)
        return built[spec]

    return make


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database + ephemeral API) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def count_forwards(monkeypatch):
    """Counts the batched forward passes capture runs in this process (torch and vLLM backends),
    by wrapping the backend calls `lib.capture.run` makes: a cache hit must run none."""
    import lib.capture.run as run
    import lib.capture.vllm_backend as vb

    counter = {"n": 0}

    def counting(fn):
        def wrapper(*args, **kwargs):
            counter["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run, "forward_batch", counting(run.forward_batch))
    monkeypatch.setattr(vb, "forward_batch_vllm", counting(vb.forward_batch_vllm))
    return counter
