"""Parity of the vLLM capture backend with the torch backend, on CPU, fp32.

For tiny random Qwen3 / Qwen2 / Llama models (head_dim 64: vLLM's CPU attention rejects 16)
both backends capture the same texts into shard folders; the shards must hold the same
input_ids, the same tensor names/shapes/dtypes, activations and logits within 1e-4 relative
(max|Δ| / max|torch|), and index rows that differ only in backend, capture_key, sha256 and
(maybe) bytes. One engine start per family (~20 s each on 2 cores).

These tests need vLLM and skip without it (the main venv has none). Run them in the separate
venv: `bash tests/vllm/run_parity.sh` (builds .venv-vllm once; ~2 minutes after that).
Set TOURGUIDE_PARITY_REPORT=/path.json to get the figures as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if os.environ.get("TOURGUIDE_REQUIRE_VLLM") == "1" and not HAVE_VLLM:  # run_parity.sh: never skip silently
    raise RuntimeError("TOURGUIDE_REQUIRE_VLLM=1 but vLLM is not importable; run bash tests/vllm/setup_venv.sh")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not importable in this venv; "
                       "bash tests/vllm/run_parity.sh runs these in .venv-vllm"),
]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for tiny models

TOL = 1e-4
EXTRA_HOOKS = ("model.layers.0.mlp.down_proj:input", "model.layers.1.self_attn.o_proj:input",
               "model.layers.0.mlp", "model.layers.1.self_attn", "model.norm")
# Per family: engine options. Llama gets a token budget below the prompt lengths, so vLLM
# splits prompts into chunks (chunked prefill) that the worker must stitch back by position;
# Qwen2 runs tensor-parallel on 2 ranks (activations from rank 0, logits gathered across ranks
# at drain) with a max_model_len below the model's context.
FAMILIES = {
    "qwen3": {},
    "qwen2": {"max_model_len": 128, "tensor_parallel_size": 2},
    "llama": {"max_num_batched_tokens": 32},
}
REPORT: dict[str, dict[str, float]] = {}
# Index-row fields allowed to differ, and why: `backend` is recorded; `capture_key` hashes the
# backend; `sha256` covers the shard header, which records backend and capture key (and the
# float payload differs in its last bits); `bytes` changes only when the header padding does.
ROW_FIELDS_ALLOWED_TO_DIFFER = {"backend", "capture_key", "sha256", "bytes"}


def rel_diff(a, b) -> float:
    """max|a-b| / max|a| in float64 (a = the torch backend's tensor)."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / a64.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def samples():
    from lib.store.corpus import Sample, load_texts

    corpus = load_texts()
    en = [s for s in corpus if "_en" in s.sample_id][:3]
    zh = [s for s in corpus if "_zh" in s.sample_id][:3]
    texts = [s.text for s in en + zh] + ["Hi.", en[0].text]  # a 2-token prompt and an exact duplicate
    return [Sample(i, f"text:{i}", t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def captured(request, make_tiny, samples, tmp_path_factory):
    """(family, torch dir, vllm dir, hook points, vLLM CaptureSpec, vLLM manifest) for one family."""
    import lib.capture.vllm_backend as vb

    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec

    family = request.param
    tp = FAMILIES[family].get("tensor_parallel_size", 1)
    model = make_tiny(family, head_dim=64, num_heads=2, num_kv_heads=1, hidden_size=128)
    # Module inputs are sharded under tensor parallelism (the backend refuses them there).
    hooks = ("model.layers.0", "model.layers.1") + tuple(h for h in EXTRA_HOOKS if tp == 1 or not h.endswith(":input"))
    saved_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if tp > 1 and saved_bind is None:
        # vLLM's CPU autobind wants one NUMA node per rank; pin rank r to core r % ncpu instead.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % (os.cpu_count() or 1)) for r in range(tp))
    out = tmp_path_factory.mktemp(f"parity-{family}")
    common = dict(model=str(model), hook_points=hooks, max_length=64, dtype="float32", batch_size=4)
    t_dir, v_dir = out / "torch", out / "vllm"
    run_capture(CaptureSpec(**common, backend="torch"), samples, t_dir)
    vspec = CaptureSpec(**common, backend="vllm", vllm_options=FAMILIES[family])
    starts = vb.ENGINE_STARTS
    vb.DRAIN_STATS.update(steps=0, requests=0, max_chunks=0)
    try:
        manifest = run_capture(vspec, samples, v_dir)
    finally:  # the engine read it at start; later engines must not inherit it
        if saved_bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    assert vb.ENGINE_STARTS == starts + 1, "one engine start per family"
    assert vb.DRAIN_STATS["requests"] == len(samples)
    # The small token budget really split prompts into chunks (and only there).
    assert (vb.DRAIN_STATS["max_chunks"] > 1) == ("max_num_batched_tokens" in FAMILIES[family]), vb.DRAIN_STATS
    REPORT.setdefault(family, {}).update(options=FAMILIES[family], engine_start_s=round(vb.LAST_ENGINE_START_S, 1),
                                         vllm_steps=vb.DRAIN_STATS["steps"], max_chunks=vb.DRAIN_STATS["max_chunks"])
    yield family, t_dir, v_dir, hooks, vspec, manifest
    vb.shutdown_engine()
    if os.environ.get("TOURGUIDE_PARITY_REPORT"):  # figures for run_parity.sh, rewritten per family
        Path(os.environ["TOURGUIDE_PARITY_REPORT"]).write_text(json.dumps(REPORT, indent=1, sort_keys=True))


def test_shards_match_torch_backend(captured, samples):
    """Same input_ids; same tensor names, shapes, dtypes; activations and logits within 1e-4."""
    import torch

    from lib.store.shards import load_shard, read_index
    from lib.store.validation import require_valid

    family, t_dir, v_dir, hooks, _, manifest = captured
    assert manifest["n_computed"] == len(samples)
    require_valid([v_dir])
    t_rows, v_rows = read_index(t_dir), read_index(v_dir)
    assert sorted(r.shard for r in t_rows) == sorted(r.shard for r in v_rows) and len(v_rows) == len(samples)
    worst: dict[str, float] = {}
    for r in t_rows:
        a, _ = load_shard(t_dir / r.shard)
        b, _ = load_shard(v_dir / r.shard)
        assert sorted(a) == sorted(b) == sorted(["input_ids", "logits"] + [f"act/{h}" for h in hooks])
        assert torch.equal(a["input_ids"], b["input_ids"]) and b["input_ids"].dtype == torch.int64
        for name in a:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
            if name != "input_ids":
                kind = "logits" if name == "logits" else "act"
                worst[kind] = max(worst.get(kind, 0.0), rel_diff(a[name], b[name]))
                assert rel_diff(a[name], b[name]) <= TOL, f"{family} {r.shard} {name}: {rel_diff(a[name], b[name]):.2e}"
    REPORT[family].update({f"max_rel_{k}": v for k, v in worst.items()})
    # The 2-token prompt and the duplicate prompt came back as themselves.
    lengths = {r.sample_id: r.n_tokens for r in v_rows}
    assert lengths["text:6"] <= 3 and lengths["text:7"] == lengths["text:0"]


def test_no_logits_capture_stores_the_same_activations_without_logits(captured, samples, tmp_path):
    """--no-logits: same engine (logits are not part of its key), no final-norm hook, no logits
    tensor, index rows say logits=false; activations as in the run with logits."""

    import lib.capture.vllm_backend as vb

    from lib.capture.run import run_capture
    from lib.store.shards import load_shard, read_index

    _, _, v_dir, hooks, vspec, _ = captured
    starts = vb.ENGINE_STARTS
    run_capture(vspec.model_copy(update={"logits": False}), samples[:3], tmp_path / "nologits")
    assert vb.ENGINE_STARTS == starts
    for r in read_index(tmp_path / "nologits"):
        assert r.logits is False and "logits" not in r.shapes
        b, _ = load_shard(tmp_path / "nologits" / r.shard)
        a, _ = load_shard(v_dir / r.shard)
        assert sorted(b) == sorted(["input_ids"] + [f"act/{h}" for h in hooks])
        for name in b:
            assert rel_diff(a[name], b[name]) <= TOL, name


def test_index_rows_differ_only_in_backend_fields(captured):

    from lib.store.shards import load_shard, read_index

    family, t_dir, v_dir, *_ = captured
    t_rows = {r.shard: r.model_dump() for r in read_index(t_dir)}
    differing: set[str] = set()
    for r in read_index(v_dir):
        v, t = r.model_dump(), t_rows[r.shard]
        assert v["backend"] == "vllm" and t["backend"] == "torch"
        differing |= {k for k in v if v[k] != t[k]}
        _, v_meta = load_shard(v_dir / r.shard, names=[])
        _, t_meta = load_shard(t_dir / r.shard, names=[])
        assert {k for k in v_meta if v_meta[k] != t_meta.get(k)} == {"backend", "capture_key"}
    assert {"backend", "capture_key", "sha256"} <= differing <= ROW_FIELDS_ALLOWED_TO_DIFFER, differing
    REPORT[family]["row_fields_differing"] = sorted(differing)  # type: ignore[assignment]


def test_tolerance_is_not_vacuous(captured):
    """Negative control: a neighbouring layer, or the next sample's rows, fail the tolerance."""
    from lib.store.shards import load_shard, read_index

    _, t_dir, v_dir, *_ = captured
    rows = read_index(t_dir)
    a, _ = load_shard(t_dir / rows[0].shard)
    b, _ = load_shard(v_dir / rows[0].shard)
    assert rel_diff(a["act/model.layers.1"], b["act/model.layers.0"]) > 100 * TOL
    n = min(len(a["logits"]), 8)
    assert rel_diff(a["logits"][:n], b["logits"][1 : n + 1]) > 100 * TOL


def test_rerun_is_served_from_shards_without_engine(captured, samples, count_forwards):
    import lib.capture.run as capture
    import lib.capture.vllm_backend as vb

    _, _, v_dir, _, vspec, _ = captured
    starts = vb.ENGINE_STARTS
    manifest = capture.run_capture(vspec, samples, v_dir)
    assert manifest["n_computed"] == 0 and manifest["n_reused"] == len(samples)
    assert vb.ENGINE_STARTS == starts and count_forwards["n"] == 0


def test_no_captures_is_a_loud_error(captured, samples):
    """Arm the workers and drain without running the prompts: zero captures must raise, not
    yield empty shards (what a vLLM whose runner bypasses hooks would produce)."""
    import lib.capture.vllm_backend as vb

    from lib.capture.plan import plan_capture
    from lib.capture.vllm_support import check_prompt_lengths
    from lib.core.errors import BadInputError

    family, _, _, hooks, vspec, _ = captured
    plan = plan_capture(vspec, samples[:1])
    engine = vb.get_engine(vspec, plan)
    vb.arm_engine(engine, hooks, True, "float32")
    with pytest.raises(BadInputError, match="recorded nothing"):
        vb.drain_engine(engine, list(plan.items), {plan.items[0].capture_key: "0"})
    with pytest.raises(BadInputError, match="max_model_len"):
        check_prompt_lengths(list(plan.items), len(plan.items[0].token_ids))
    # A worker's own refusal travels back through collective_rpc as a BadInputError, and the
    # engine survives it (the next capture of this family still works: see the rerun test).
    with pytest.raises(BadInputError, match=r"refused.*has no module\(s\) \['model\.layers\.9'\]"):
        vb.arm_engine(engine, ("model.layers.9",), False, "float32")
    assert vb.get_engine(vspec, plan) is engine

