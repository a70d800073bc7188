"""Torch capture backend vs HF's own outputs (fp32), batching, padding, truncation, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lib.capture.torch_backend as capture
from lib.capture.plan import plan_capture
from lib.capture.run import run_capture
from lib.capture.spec import CaptureSpec
from lib.core.errors import BadInputError, ModelLoadError
from lib.store.corpus import Sample, load_texts
from lib.store.shards import load_shard, read_index

TEXTS = [
    "The Sydney Opera House rises over Bennelong Point like a fleet of white sails.",
    "Bondi Beach.",
    "故宫是明清两代的皇家宫殿，红墙黄瓦，气势恢宏。",
]


def samples(texts=TEXTS):
    return [Sample(i, f"text:{i}", t) for i, t in enumerate(texts)]


def hf_reference(model_dir: Path, text: str):
    """HF's own view of one unpadded text: hidden_states, input of the final norm, logits."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    seen = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm_in", a[0].detach().clone()))
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    h.remove()
    return ids[0], out.hidden_states, seen["norm_in"][0], out.logits[0]


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_blocks_equal_hf_hidden_states(make_tiny, tmp_path, family):
    model_dir = make_tiny(family)
    spec = CaptureSpec(model=str(model_dir), batch_size=3)
    run_capture(spec, samples(), tmp_path / "cap")
    rows = sorted(read_index(tmp_path / "cap"), key=lambda r: r.sample_index)
    n_layers = len(rows[0].layers)
    for row, text in zip(rows, TEXTS, strict=True):
        tensors, meta = load_shard(tmp_path / "cap" / row.shard)
        ids, hidden, norm_in, logits = hf_reference(model_dir, text)
        assert torch.equal(tensors["input_ids"], ids)
        for i in range(n_layers - 1):
            torch.testing.assert_close(tensors[f"act/model.layers.{i}"], hidden[i + 1][0], atol=1e-5, rtol=1e-5)
        # HF's last hidden_states entry is after the final norm; our last block is before it.
        last = tensors[f"act/model.layers.{n_layers - 1}"]
        torch.testing.assert_close(last, norm_in, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(last, hidden[-1][0], atol=1e-3), "negative control: post-norm differs"
        torch.testing.assert_close(tensors["logits"], logits, atol=1e-4, rtol=1e-4)
        assert meta["text"] == text and meta["sample_id"] == row.sample_id


def test_batched_equals_per_sample_and_pads_are_dropped(make_tiny, tmp_path):
    model_dir = make_tiny("qwen3")
    run_capture(CaptureSpec(model=str(model_dir), batch_size=3), samples(), tmp_path / "batched")
    run_capture(CaptureSpec(model=str(model_dir), batch_size=1), samples(), tmp_path / "single")
    tok = AutoTokenizer.from_pretrained(model_dir)
    batched = sorted(read_index(tmp_path / "batched"), key=lambda r: r.sample_index)
    single = sorted(read_index(tmp_path / "single"), key=lambda r: r.sample_index)
    start = 0
    for rb, rs, text in zip(batched, single, TEXTS, strict=True):
        tb, _ = load_shard(tmp_path / "batched" / rb.shard)
        ts, _ = load_shard(tmp_path / "single" / rs.shard)
        n = len(tok(text)["input_ids"])
        assert rb.n_tokens == n and rb.token_start == start and rb.token_end == start + n
        start += n
        for name, t in tb.items():
            assert t.shape[0] == n, f"{name} stores {t.shape[0]} positions for {n} real tokens"
            torch.testing.assert_close(t, ts[name], atol=1e-5, rtol=1e-5)
        assert rb.shapes == {k: list(v.shape) for k, v in tb.items()}
    # padding really happened: the longest text is longer than the others
    assert len({r.n_tokens for r in batched}) == 3


def test_truncation_is_recorded(make_tiny, tmp_path):
    model_dir = make_tiny("llama")
    lengths = [len(AutoTokenizer.from_pretrained(model_dir)(t)["input_ids"]) for t in TEXTS]
    limit = min(lengths)  # the shortest text fits exactly: stored whole, not flagged
    run_capture(CaptureSpec(model=str(model_dir), max_length=limit), samples(), tmp_path / "cap")
    rows = sorted(read_index(tmp_path / "cap"), key=lambda r: r.sample_index)
    for row, n in zip(rows, lengths, strict=True):
        assert row.n_tokens == min(n, limit)
        assert row.truncated == (n > limit)
    assert any(r.truncated for r in rows) and not all(r.truncated for r in rows)


def test_no_logits_skips_lm_head_and_module_inputs(make_tiny, tmp_path):
    model_dir = make_tiny("qwen2")
    hooks = ("model.layers.1", "model.layers.0.mlp.down_proj:input", "model.layers.1.self_attn.o_proj:input")
    spec = CaptureSpec(model=str(model_dir), hook_points=hooks, logits=False)
    plan = plan_capture(spec, samples())
    lm = capture.get_model(spec, plan)
    calls = []
    h = lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        run_capture(spec, samples(), tmp_path / "cap")
    finally:
        h.remove()
    assert calls == [], "lm_head ran although logits were off"
    row = read_index(tmp_path / "cap")[0]
    tensors, _ = load_shard(tmp_path / "cap" / row.shard)
    assert "logits" not in tensors and set(row.layers) == set(hooks)
    # oracle for the module input: a pre-hook on a separately loaded HF model, one unpadded text
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tensors["input_ids"][None]
    seen = {}
    hk = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0].clone()))
    with torch.inference_mode():
        model(input_ids=ids)
    hk.remove()
    torch.testing.assert_close(tensors["act/model.layers.0.mlp.down_proj:input"], seen["x"], atol=1e-5, rtol=1e-5)
    assert tensors["act/model.layers.0.mlp.down_proj:input"].shape[-1] == model.config.intermediate_size
    assert tensors["act/model.layers.1.self_attn.o_proj:input"].shape[-1] == model.config.num_attention_heads * 32


def test_bad_inputs_write_nothing(make_tiny, tmp_path):
    model_dir = str(make_tiny("qwen3"))
    out = tmp_path / "out"

    def fails(exc, match, spec=None, texts=None, text_files=None):
        with pytest.raises(exc, match=match):
            ss = load_texts(texts, text_files) if (texts or text_files) else samples()
            run_capture(spec or CaptureSpec(model=model_dir), ss, out)
        assert not out.exists(), "a failed capture wrote output"

    fails(BadInputError, "--text #1 is empty", texts=[""])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fails(BadInputError, "empty.txt: has no non-empty lines", text_files=[str(empty)])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    fails(BadInputError, "latin1.txt: not valid UTF-8", text_files=[str(latin)])
    fails(BadInputError, r"'model.layers.9' is not a module.*model.layers.0", CaptureSpec(model=model_dir, hook_points=("model.layers.9",)))
    fails(ModelLoadError, "local model folder not found", CaptureSpec(model=str(tmp_path / "nope") + "/"))
    fails(ModelLoadError, r"'Qwen/Qwen3-0.6B'.*not in the HF cache at .*hf", CaptureSpec(model="Qwen/Qwen3-0.6B"))
    with pytest.raises(BadInputError, match="capture spec: max_length: --max-length must be >= 1"):
        CaptureSpec(model=model_dir, max_length=0)  # refused when built, before anything runs
    out.write_text("i am a file")
    with pytest.raises(BadInputError, match="is a file"):
        run_capture(CaptureSpec(model=model_dir), samples(), out)
    assert out.read_text() == "i am a file"


def test_compute_dtype_decides_the_capture_key(make_tiny, tmp_path, count_forwards):
    """A bf16 forward stored as fp32 is not an fp32 forward: re-capturing with another compute
    dtype must recompute every shard (it used to be served the bf16 bytes), and the header says
    which forward made it."""
    model_dir = str(make_tiny("qwen3"))
    out = tmp_path / "cap"
    bf16 = CaptureSpec(model=model_dir, dtype="float32", compute_dtype="bfloat16", batch_size=3)
    fp32 = CaptureSpec(model=model_dir, dtype="float32", compute_dtype="float32", batch_size=3)
    with pytest.warns(UserWarning, match="slower"):
        first = run_capture(bf16, samples(), out)
    assert first["n_computed"] == 3
    bf16_rows = {r.sample_index: r for r in read_index(out)}
    second = run_capture(fp32, samples(), out)
    assert second["n_computed"] == 3 and second["n_reused"] == 0, "fp32 capture served the bf16 shards"
    rows = {r.sample_index: r for r in read_index(out)}
    assert len(read_index(out)) == 3, "the bf16 rows must be replaced, not kept beside the fp32 ones"
    for i, row in rows.items():
        assert row.capture_key != bf16_rows[i].capture_key and row.sha256 != bf16_rows[i].sha256
        assert row.extra["compute_dtype"] == "float32" and row.extra["device"] == "cpu"
        _, meta = load_shard(out / row.shard)
        assert meta["compute_dtype"] == "float32"
    # negative control: the same settings again are served from the shards
    before = count_forwards["n"]
    assert run_capture(fp32, samples(), out)["n_computed"] == 0 and count_forwards["n"] == before


def test_capture_key_covers_every_setting_that_decides_the_bytes(make_tiny):
    from lib.capture.plan import capture_numerics

    model_dir = str(make_tiny("qwen3"))
    base = CaptureSpec(model=model_dir)
    keys = {plan_capture(base, samples()).items[0].capture_key}
    for change in (dict(compute_dtype="bfloat16"), dict(dtype="bfloat16"), dict(max_length=4), dict(logits=False),
                   dict(hook_points=("model.layers.0",))):
        keys.add(plan_capture(CaptureSpec(model=model_dir, **change), samples()).items[0].capture_key)
    assert len(keys) == 6, "a setting that changes the bytes left the capture key unchanged"
    num = capture_numerics(base)
    assert num["compute_dtype"] == "float32" and num["device"] == "cpu" and num["torch"] == torch.__version__
    # run options that do not change the bytes keep the key (so the cache still hits)
    same = plan_capture(CaptureSpec(model=model_dir, batch_size=1), samples()).items[0].capture_key
    assert same in keys
