"""The fold end to end against HF's own forward pass (fp32, save → reload): every transform alone
and all together on Llama / Qwen2 (biases) / Qwen3 (q_norm/k_norm), GQA, tied and untied; the
negative controls the gate must catch; the gate's own math against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lib.core.errors import GateFailedError
from lib.fold.checkpoint import FAILED_MARKER, fold_checkpoint
from lib.fold.gate import GateOptions, check_equivalence, compare_probes, format_gate, make_probe_batch
from lib.fold.gate_record import gate_fold
from lib.fold.options import FoldOptions
from lib.fold.transform_set import WeightTransformSet
from lib.store.ledgers import read_ledger
from lib.testing.random_transforms import random_head_permutation, random_rotation
from tests.fold_bugs import BUGS, inject_fold_bug

H, G, HD, D, INTER = 4, 2, 32, 128, 256
PROBE = GateOptions(n_texts=4, max_length=48)


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def transforms(kind: str, cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    parts = {
        "rotation": {"residual_rotation": random_rotation(D, seed + 1)},
        "heads": {"head_permutations": {0: random_head_permutation(H, G, seed + 2), 1: np.array([3, 2, 1, 0])}},
        "neurons": {"neuron_permutations": {0: rng.permutation(INTER), 1: rng.permutation(INTER)}},
        "vo": {"vo_rotations": {i: np.stack([random_rotation(HD, seed + 10 * i + g) for g in range(G)])
                                for i in range(2)}},
    }
    if kind == "all":
        return {k: v for p in parts.values() for k, v in p.items()}
    return parts[kind]


def assert_equivalent(result) -> None:
    assert result.status == "passed", format_gate(result)
    assert result.max_abs_logit_diff <= 1e-4
    assert result.mean_kl <= 1e-9
    assert result.top1_agreement == 1.0
    assert result.hidden_cosine_min >= 1 - 1e-9
    assert result.n_tokens > 50


CASES = [(fam, tie, kind) for fam in ("llama", "qwen2", "qwen3") for tie in (False, True)
         for kind in ("rotation", "all")]
CASES += [(fam, False, kind) for fam in ("llama", "qwen2", "qwen3") for kind in ("heads", "neurons", "vo")]


@pytest.mark.parametrize("family,tie,kind", CASES)
def test_fold_preserves_the_function(make_tiny, tmp_path, family, tie, kind):
    model_dir = make_tiny(family, tie=tie)
    ts = WeightTransformSet.from_arrays(config_of(model_dir), **transforms(kind, config_of(model_dir)))
    out = tmp_path / "folded"
    res = fold_checkpoint(model_dir, out, ts, FoldOptions(max_shard_bytes=600_000))
    result = gate_fold(model_dir, out, ts, PROBE)
    assert_equivalent(result)
    report = json.loads((out / "fold_report.json").read_text())
    assert report["status"] == "passed" and report["gate"]["mean_kl"] == result.mean_kl
    assert report["fold"]["untied"] is (tie and kind in ("rotation", "all")) is res.untied
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (model_dir / f).read_bytes(), f
    if kind in ("rotation", "all"):
        folded = AutoModelForCausalLM.from_pretrained(out)
        assert folded.config.tie_word_embeddings is False
        assert folded.lm_head.weight.data_ptr() != folded.model.embed_tokens.weight.data_ptr()
        assert not torch.equal(folded.lm_head.weight, folded.model.embed_tokens.weight)
        assert torch.equal(folded.model.norm.weight, torch.ones(D))  # gains folded (γ = 1), module kept
        assert folded.model.layers[0].input_layernorm.variance_epsilon == 1e-6


def test_signed_permutation_keeps_the_tie(make_tiny, tmp_path):
    """A residual (signed) permutation on a tied model permutes the norm gains instead of folding
    them, so lm_head stays tied (the fold rules, lib/fold/checkpoint.py)."""
    model_dir = make_tiny("qwen3", tie=True)
    rng = np.random.default_rng(0)
    p = np.eye(D)[rng.permutation(D)] * rng.choice([-1.0, 1.0], size=D)[:, None]
    ts = WeightTransformSet.from_arrays(config_of(model_dir), residual_rotation=p)
    res = fold_checkpoint(model_dir, tmp_path / "out", ts)
    assert not res.untied and res.gains_permuted
    assert_equivalent(gate_fold(model_dir, tmp_path / "out", ts, PROBE))
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert folded.config.tie_word_embeddings is True
    assert folded.lm_head.weight.data_ptr() == folded.model.embed_tokens.weight.data_ptr()


def test_bf16_output_is_a_smoke_test(make_tiny, tmp_path):
    model_dir = make_tiny("qwen2")
    ts = WeightTransformSet.from_arrays(config_of(model_dir), **transforms("all", config_of(model_dir)))
    fold_checkpoint(model_dir, tmp_path / "out", ts, FoldOptions(dtype="bfloat16"))
    result = gate_fold(model_dir, tmp_path / "out", ts, PROBE)
    assert result.status == "passed" and result.checkpoint_dtype == "bfloat16"
    assert result.thresholds["max_mean_kl"] == 1e-2 and 1e-9 < result.mean_kl < 1e-3


# ----------------------------------------------------------------------------------------------
# negative controls: each known fold bug must move KL by >= 1e-4 and be caught
# ----------------------------------------------------------------------------------------------
NEGATIVE = {
    # name: (family, tie, transforms kwargs builder, injected fold bug (tests/fold_bugs.py), allow_inexact)
    "rotation_without_gain_fold": ("llama", False, lambda: transforms("rotation", {}), "no_gain_fold", False),
    "rotation_keeping_the_tie": ("qwen3", True, lambda: transforms("rotation", {}), "keep_tie", False),
    "qwen2_heads_forgetting_biases": ("qwen2", False, lambda: {"head_permutations": {0: np.array([2, 3, 1, 0])}},
                                      "unpermuted_qkv_bias", False),
    "per_layer_rotations": ("qwen3", False, lambda: {"layer_rotations": {0: random_rotation(D, 1),
                                                                         1: random_rotation(D, 2)}}, None, True),
    "query_head_across_kv_groups": ("llama", False, lambda: {"head_permutations": {0: np.array([0, 2, 1, 3])}},
                                    None, True),
}


@pytest.mark.parametrize("bug", sorted(NEGATIVE))
def test_gate_catches_known_fold_bugs(make_tiny, tmp_path, monkeypatch, bug):
    family, tie, kwargs, injected, inexact = NEGATIVE[bug]
    model_dir = make_tiny(family, tie=tie)
    ts = WeightTransformSet.from_arrays(config_of(model_dir), allow_inexact=inexact, **kwargs())
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    out = run / "checkpoints" / "bad"
    if injected:
        inject_fold_bug(monkeypatch, injected)
    fold_checkpoint(model_dir, out, ts)
    if inexact:
        # Folded on explicit opt-in: measured and reported as drift, never a pass, no exception.
        result = gate_fold(model_dir, out, ts, PROBE)
        assert result.status == "inexact" and not result.passed and not result.exact
        assert not (out / FAILED_MARKER).exists()
    else:
        with pytest.raises(GateFailedError, match="does not reproduce.*marked failed") as err:
            gate_fold(model_dir, out, ts, PROBE)
        assert "mean KL" in str(err.value)
        assert (out / FAILED_MARKER).exists()
        result = check_equivalence(model_dir, out, ts, PROBE)
        assert result.status == "failed" and result.failures
    assert result.mean_kl >= 1e-4, f"{bug}: KL {result.mean_kl:.3g} — the gate could not see this bug"
    report = json.loads((out / "fold_report.json").read_text())
    assert report["status"] == result.status
    ledger = read_ledger(run / "ledgers" / "fold", "fold")
    assert len(ledger) == 1 and ledger.loc[0, "status"] == result.status and not ledger.loc[0, "passed"]
    assert ledger.loc[0, "mean_kl"] == pytest.approx(result.mean_kl) and ledger.loc[0, "run_id"] == "run"


def test_every_known_fold_bug_is_a_negative_control_and_none_is_an_option():
    """The bugs are injected by tests only: each has a case above, and no FoldOptions key (hence
    no CLI flag or deployment parameter) can switch one on."""
    from lib.core.errors import BadInputError

    assert {case[3] for case in NEGATIVE.values()} - {None} == set(BUGS)
    for switch in ("fold_gains", "untie", "permute_qkv_bias"):
        with pytest.raises(BadInputError, match=rf"fold options: {switch}: unknown key"):
            FoldOptions.model_validate({switch: False})


def test_passing_fold_in_a_run_writes_a_ledger_row(make_tiny, tmp_path):
    model_dir = make_tiny("qwen3")
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run_id": "night-42"}))
    ts = WeightTransformSet.from_arrays(config_of(model_dir), **transforms("all", {}))
    fold_checkpoint(model_dir, run / "checkpoints" / "rotated", ts)
    gate_fold(model_dir, run / "checkpoints" / "rotated", ts, PROBE, source_ref="teacher")
    row = read_ledger(run / "ledgers" / "fold", "fold").iloc[0]
    assert row["run_id"] == "night-42" and row["passed"] and row["exact"] and row["checkpoint"] == "teacher"
    assert row["n_probe_tokens"] > 50 and row["dtype"] == "float32" and row["mean_kl"] <= 1e-9


# ----------------------------------------------------------------------------------------------
# the gate's own arithmetic
# ----------------------------------------------------------------------------------------------
def test_compare_probes_against_numpy():
    from scipy.special import log_softmax

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(150, 30)), rng.normal(size=(150, 30))  # > one 64-row chunk
    b[:20] = a[:20] + 1e-3 * rng.normal(size=(20, 30))
    q = random_rotation(8, 3)
    h = rng.normal(size=(150, 8))
    h_out = h @ q
    h_out[5] = -h_out[5]  # one token flipped: cosine −1 in the common basis
    src = {"logits": torch.from_numpy(a).float(), "hidden": {"b0": torch.from_numpy(h).float()}}
    out = {"logits": torch.from_numpy(b).float(), "hidden": {"b0": torch.from_numpy(h_out).float()}}
    got = compare_probes(src, out, {"b0": q})
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    la, lb = log_softmax(a32, -1), log_softmax(b32, -1)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    assert got["mean_kl"] == pytest.approx(kl.mean(), rel=1e-9) and got["max_kl"] == pytest.approx(kl.max(), rel=1e-9)
    assert got["max_abs_logit_diff"] == pytest.approx(np.abs(a32 - b32).max(), rel=1e-9)
    assert got["top1_agreement"] == pytest.approx((a.argmax(-1) == b.argmax(-1)).mean())
    assert got["hidden_cosine_min"] == pytest.approx(-1.0, abs=1e-6)
    assert compare_probes(src, out, {})["hidden_cosine_min"] < 0.99  # without the basis it does not line up


def test_probe_batch_is_right_padded_corpus_text(make_tiny):
    batch = make_probe_batch(make_tiny("qwen3"), GateOptions(n_texts=5, max_length=16))
    mask = batch.attention_mask
    assert batch.input_ids.shape == mask.shape and batch.input_ids.shape[0] == 5 and mask.shape[1] <= 16
    assert batch.source == "corpus"  # samples/*.txt, spread over both languages
    # right padding: every row is ones then zeros
    assert torch.equal(mask, (torch.arange(mask.shape[1])[None] < mask.sum(1, keepdim=True)).long())


def test_gate_kl_is_the_qa_kl_and_survives_masked_tokens():
    """Checkpoints that mask vocabulary entries (logit -inf, p = 0) must compare as equal, not as
    NaN; the gate uses the same KL as the QA metric (float64, p = 0 terms count 0)."""
    from lib.qa.token_metrics import compute_token_kl

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float32)
    logits[:, 3] = float("-inf")  # a masked id in both checkpoints
    hidden = {"model.layers.0": torch.randn(6, 4, generator=g)}
    same = compare_probes({"logits": logits, "hidden": hidden}, {"logits": logits.clone(), "hidden": hidden})
    assert same["mean_kl"] == 0.0 and same["max_kl"] == 0.0 and same["max_abs_logit_diff"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["hidden_cosine_min"] == pytest.approx(1.0)
    shifted = logits.clone()
    shifted[:, 0] += 0.5
    figures = compare_probes({"logits": logits, "hidden": hidden}, {"logits": shifted, "hidden": hidden})
    kl = compute_token_kl(logits, shifted)
    assert figures["mean_kl"] == pytest.approx(float(kl.mean()), rel=1e-12) and figures["mean_kl"] > 0
    assert figures["max_abs_logit_diff"] == pytest.approx(0.5)
