"""Neuron / GQA head matching: synthetic oracles, and a tiny model whose student is the teacher
with planted (function-preserving) head and MLP permutations, recovered exactly end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.errors import BadInputError
from lib.transport.permutations import HeadCorrelation, NeuronCorrelation, is_gqa_valid, match_heads_gqa, match_units


def test_correlation_accumulators_equal_numpy_corrcoef():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    y = x[:, ::-1] + 0.5 * rng.standard_normal((200, 12))
    nc = NeuronCorrelation(12, 12)
    for i in range(0, 200, 33):
        nc.update(x[i:i + 33], y[i:i + 33])
    np.testing.assert_allclose(nc.correlation(), np.corrcoef(x.T, y.T)[:12, 12:], atol=1e-10)

    h, hd = 4, 3
    hc = HeadCorrelation(h, hd)
    hc.update(x, y)
    want = np.zeros((h, h))
    for a in range(h):
        for b in range(h):
            want[a, b] = np.mean([np.corrcoef(x[:, a * hd + c], y[:, b * hd + c])[0, 1] for c in range(hd)])
    np.testing.assert_allclose(hc.similarity(), want, atol=1e-10)


def test_constant_unit_correlates_zero_not_nan():
    nc = NeuronCorrelation(2, 2)
    x = np.column_stack([np.ones(10), np.arange(10.0)])
    nc.update(x, x)
    c = nc.correlation()
    assert np.all(np.isfinite(c)) and c[0, 0] == 0 and np.isclose(c[1, 1], 1)


def test_match_units_recovers_a_planted_permutation():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((300, 40))
    pi = rng.permutation(40)
    s = t[:, pi] + 0.05 * rng.standard_normal((300, 40))  # student unit j = teacher unit pi[j]
    nc = NeuronCorrelation(40, 40)
    nc.update(s, t)
    m = match_units(nc.correlation())
    np.testing.assert_array_equal(m.perm, np.argsort(pi))  # student[:, perm] lines up with the teacher
    np.testing.assert_allclose(s[:, m.perm], t, atol=0.3)
    assert m.mean_matched > 0.99


def _gqa_perm(kv, inner):
    r = len(inner[0])
    return np.array([kv[g] * r + inner[g][i] for g in range(len(kv)) for i in range(r)])


def test_two_level_matching_keeps_query_heads_in_their_kv_group():
    # 8 heads, 2 kv groups of 4. The best *unconstrained* matching crosses groups; GQA forbids it.
    h, g = 8, 2
    pi = _gqa_perm([1, 0], [[2, 0, 3, 1], [1, 3, 0, 2]])
    sim = np.full((h, h), 0.1)
    sim[pi, np.arange(h)] = 0.8  # student head pi[j] is teacher head j
    sim[pi[0], 0] = 0.5
    sim[pi[4], 0] = sim[pi[0], 4] = 0.95  # a tempting swap across kv groups
    free = match_units(sim)
    assert not is_gqa_valid(free.perm, h, g), "negative control: plain Hungarian crosses kv groups"
    m = match_heads_gqa(sim, g)
    assert is_gqa_valid(m.perm, h, g)
    np.testing.assert_array_equal(m.perm, pi)
    np.testing.assert_array_equal(m.kv_perm, [1, 0])
    with pytest.raises(BadInputError, match="kv groups"):
        match_heads_gqa(sim, 3)


def test_is_gqa_valid():
    assert is_gqa_valid(np.array([2, 3, 0, 1]), 4, 2)
    assert is_gqa_valid(np.array([1, 0, 3, 2]), 4, 2)
    assert not is_gqa_valid(np.array([0, 2, 1, 3]), 4, 2)
    assert not is_gqa_valid(np.array([0, 0, 1, 2]), 4, 2)


# ----------------------------------------------------------------------------------------------
# end to end on a tiny model
# ----------------------------------------------------------------------------------------------
def permute_model_state(state: dict[str, torch.Tensor], config: dict, heads: dict[int, np.ndarray],
                        neurons: dict[int, np.ndarray]) -> dict[str, torch.Tensor]:
    """The function-preserving permutation (new = old[perm]) of heads (GQA: kv heads follow) and
    MLP neurons, written out independently of the code under test."""
    h, g = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // h
    r = h // g
    out = dict(state)
    for i, perm in heads.items():
        kv = perm[::r] // r
        p = f"model.layers.{i}.self_attn."
        for name in ("q_proj.weight", "q_proj.bias"):
            if p + name in state:
                t = state[p + name]
                out[p + name] = t.reshape(h, hd, *t.shape[1:])[torch.as_tensor(perm)].reshape(t.shape)
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            if p + name in state:
                t = state[p + name]
                out[p + name] = t.reshape(g, hd, *t.shape[1:])[torch.as_tensor(kv)].reshape(t.shape)
        o = state[p + "o_proj.weight"]
        out[p + "o_proj.weight"] = o.reshape(o.shape[0], h, hd)[:, torch.as_tensor(perm)].reshape(o.shape)
    for i, perm in neurons.items():
        p = f"model.layers.{i}.mlp."
        idx = torch.as_tensor(perm)
        out[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][idx]
        out[p + "up_proj.weight"] = state[p + "up_proj.weight"][idx]
        out[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, idx]
    return out


def _logits(model_dir: Path, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0] for t in texts]


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_solver_recovers_planted_gqa_head_and_mlp_permutations(make_tiny, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.fold.transform_set import WeightTransformSet
    from lib.store.corpus import Sample, load_texts
    from lib.store.safetensors_io import load_tensors
    from lib.transport.options import RotateOptions
    from lib.transport.record import run_rotation

    teacher_dir = make_tiny(family)
    config = json.loads((teacher_dir / "config.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    planted_heads = {0: _gqa_perm([1, 0], [[1, 0], [0, 1]]), 1: _gqa_perm([0, 1], [[0, 1], [1, 0]])}
    rng = np.random.default_rng(5)
    planted_neurons = {i: rng.permutation(config["intermediate_size"]) for i in (0, 1)}
    student_state = permute_model_state(state, config, planted_heads, planted_neurons)
    teacher.load_state_dict(student_state)
    student_dir = tmp_path / "student"
    teacher.save_pretrained(student_dir)
    for f in teacher_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, student_dir / f.name)

    texts = [s.text for s in load_texts(None, None, limit=8)]
    for a, b in zip(_logits(student_dir, texts[:2]), _logits(teacher_dir, texts[:2])):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)  # the planted student is the same function

    hooks = tuple(h for i in (0, 1) for h in (f"model.layers.{i}", f"model.layers.{i}.mlp.down_proj:input",
                                              f"model.layers.{i}.self_attn.o_proj:input"))
    samples = [Sample(i, f"t{i}", t) for i, t in enumerate(texts)]
    run_dir = tmp_path / "run"
    (run_dir / "ledgers").mkdir(parents=True)
    for who, d in (("student", student_dir), ("teacher", teacher_dir)):
        run_capture(CaptureSpec(model=str(d), hook_points=hooks, logits=False, batch_size=4), samples,
                    run_dir / "activations" / who)
    res = run_rotation(run_dir / "activations/student/metadata.jsonl", run_dir / "activations/teacher/metadata.jsonl",
                       ["model.layers.0", "model.layers.1"], run_dir / "rotations",
                       spec_out=run_dir / "transforms.json", options=RotateOptions(solve_permutations=True))
    for row in res["layers"]:
        i = int(row["layer"].rsplit(".", 1)[1])
        heads = load_tensors(row["permutations"]["heads_path"])[0]
        mlp = load_tensors(row["permutations"]["mlp_path"])[0]
        np.testing.assert_array_equal(heads["permutation"], np.argsort(planted_heads[i]))
        np.testing.assert_array_equal(heads["kv_permutation"], np.argsort(planted_heads[i][::2] // 2))
        np.testing.assert_array_equal(mlp["permutation"], np.argsort(planted_neurons[i]))
        assert heads["permutation"].dtype == np.int64 and row["permutations"]["mlp_mean_correlation"] > 0.999
        # permutations leave the residual stream alone: the rotation is the identity
        assert row["cosine_after"] > 0.99999 and row["dist_to_global"] < 1e-3
    q = load_tensors(res["global"]["rotation_path"])[0]["rotation"]
    assert np.max(np.abs(q - np.eye(q.shape[0]))) < 1e-4

    # Applying the solved permutations to the student gives back the teacher's weights exactly.
    solved_h = {i: load_tensors(res["layers"][i]["permutations"]["heads_path"])[0]["permutation"] for i in (0, 1)}
    solved_n = {i: load_tensors(res["layers"][i]["permutations"]["mlp_path"])[0]["permutation"] for i in (0, 1)}
    back = permute_model_state(student_state, config, solved_h, solved_n)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0)

    # transforms.json is the fold's contract: the fold's own validator reads it back.
    spec = json.loads((run_dir / "transforms.json").read_text())
    assert spec["layers"][0]["head_dim"] == 32 and spec["residual_rotation_path"] == "rotations/global.safetensors"
    ts = WeightTransformSet.from_spec(run_dir / "transforms.json", config)
    for i in (0, 1):
        np.testing.assert_array_equal(ts.head_permutations[i].perm, np.argsort(planted_heads[i]))
        np.testing.assert_array_equal(ts.neuron_permutations[i], np.argsort(planted_neurons[i]))
    assert ts.exact and ts.residual_rotation is not None


def test_permutations_need_the_module_inputs(make_tiny, tmp_path):
    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import Sample
    from lib.transport.options import RotateOptions
    from lib.transport.record import run_rotation

    model = make_tiny("llama")
    for who in ("s", "t"):
        run_capture(CaptureSpec(model=str(model), logits=False), [Sample(0, "t0", "Bondi Beach at dawn.")], tmp_path / who)
    with pytest.raises(BadInputError, match=r"model.layers.0.mlp.down_proj:input.*--layer"):
        run_rotation(tmp_path / "s", tmp_path / "t", ["model.layers.0"], tmp_path / "rot",
                     options=RotateOptions(solve_permutations=True))
    assert not (tmp_path / "rot").exists()
