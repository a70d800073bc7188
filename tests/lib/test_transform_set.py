"""WeightTransformSet: spec parsing, validation (each bad spec a clear error, nothing written),
GQA head permutations, exactness, inverse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from lib.core.errors import BadInputError, NotExactError
from lib.fold.checkpoint import prepare_fold
from lib.fold.checks import check_head_permutation, derive_kv_permutation, orthogonality_error
from lib.fold.spec import write_transform_spec
from lib.fold.transform_set import WeightTransformSet
from lib.models.adapters import adapter_for_config
from lib.testing.random_transforms import random_head_permutation, random_rotation

CFG = {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 24, "vocab_size": 50}


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_spec_round_trip_keeps_every_array(tmp_path):
    q = random_rotation(16, 1)
    head = random_head_permutation(4, 2, 2)
    mlp = np.random.default_rng(0).permutation(24)
    vo = np.stack([random_rotation(8, 3), random_rotation(8, 4)])
    spec = write_transform_spec(tmp_path, CFG, residual_rotation=q, head_permutations={0: head},
                                neuron_permutations={"model.layers.1": mlp}, vo_rotations={1: vo})
    ts = WeightTransformSet.from_spec(spec, CFG)
    assert ts.exact and ts.spec_path == str(spec) and len(ts.spec_digest) == 64
    np.testing.assert_array_equal(ts.residual_rotation, q)
    np.testing.assert_array_equal(ts.head_permutations[0].perm, head)
    np.testing.assert_array_equal(ts.neuron_permutations[1], mlp)
    np.testing.assert_array_equal(ts.vo_rotations[1], vo)
    assert ts.orthogonality["residual_rotation"] < 1e-12
    # kv_perm re-derived: new kv head g holds the old kv group of its query heads.
    r = 2
    assert [int(head[g * r]) // r for g in range(2)] == ts.head_permutations[0].kv_perm.tolist()
    # Solver-written extras (singular values, PCA bases) are ignored; a per-layer rotation equal
    # to the global Q is exact.
    save_file({"rotation": q, "singular_values": np.ones(16)}, str(tmp_path / "rotations" / "l0.safetensors"))
    raw = json.loads(spec.read_text())
    raw["layers"][0]["rotation_path"] = "rotations/l0.safetensors"
    spec.write_text(json.dumps(raw))
    assert WeightTransformSet.from_spec(spec, CFG).exact
    # The spec digest changes when a referenced file changes.
    save_file({"rotation": random_rotation(16, 9)}, str(tmp_path / "rotations" / "global.safetensors"))
    assert WeightTransformSet.from_spec(spec, CFG, allow_inexact=True).spec_digest != ts.spec_digest


def test_per_layer_rotations_that_agree_fold_as_the_global_q():
    q = random_rotation(16, 5)
    ts = WeightTransformSet.from_arrays(CFG, layer_rotations={0: q, 1: q + 1e-9})  # within SAME_ROTATION_TOL
    assert ts.exact and ts.layer_rotations is None
    np.testing.assert_array_equal(ts.residual_rotation, q)


@pytest.mark.parametrize("kind", ["per_layer", "qk", "gqa"])
def test_inexact_transforms_need_allow_inexact(kind):
    kw = {"per_layer": {"layer_rotations": {0: random_rotation(16, 1), 1: random_rotation(16, 2)}},
          "qk": {"qk_rotations": {0: np.stack([random_rotation(8, 1)] * 2)}},
          "gqa": {"head_permutations": {1: np.array([0, 2, 1, 3])}}}[kind]
    why = {"per_layer": "differ between blocks", "qk": "RoPE", "gqa": "breaks the GQA groups"}[kind]
    with pytest.raises(NotExactError, match=why) as err:
        WeightTransformSet.from_arrays(CFG, **kw)
    assert "--allow-inexact" in str(err.value)
    ts = WeightTransformSet.from_arrays(CFG, allow_inexact=True, **kw)
    assert not ts.exact and why in ts.inexact_reasons[0]
    if kind == "per_layer":
        assert ts.residual_rotation is None and len(ts.layer_rotations) == 2
        np.testing.assert_array_equal(ts.embed_rotation(), kw["layer_rotations"][0])
        np.testing.assert_array_equal(ts.head_rotation(), kw["layer_rotations"][1])
    with pytest.raises(NotExactError):
        ts.inverse()


def test_head_permutation_gqa_rule_against_brute_force():
    adapter = adapter_for_config(CFG)
    rng = np.random.default_rng(0)
    for _ in range(200):
        perm = rng.permutation(4)
        # Oracle: valid iff every new group's two heads come from one old group (r = 2).
        valid = all(perm[2 * g] // 2 == perm[2 * g + 1] // 2 for g in range(2))
        kv, problems = derive_kv_permutation(perm, 4, 2)
        assert (kv is not None) is valid and bool(problems) is (not valid)
        if valid:
            hp, _ = check_head_permutation(perm, adapter, "test", allow_inexact=False)
            assert sorted(hp.kv_perm.tolist()) == [0, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10**6))
def test_random_gqa_permutations_are_valid_and_one_swap_breaks_them(groups, r, seed):
    H = groups * r
    perm = random_head_permutation(H, groups, seed)
    kv, problems = derive_kv_permutation(perm, H, groups)
    assert not problems and sorted(perm.tolist()) == list(range(H))
    for g in range(groups):
        assert all(h // r == kv[g] for h in perm[g * r:(g + 1) * r])
    if groups > 1 and r > 1:
        bad = perm.copy()
        bad[0], bad[r] = bad[r], bad[0]  # move one query head across kv groups
        assert derive_kv_permutation(bad, H, groups)[0] is None


def test_inverse_composes_to_identity():
    rng = np.random.default_rng(3)
    ts = WeightTransformSet.from_arrays(
        CFG, residual_rotation=random_rotation(16, 1), head_permutations={0: random_head_permutation(4, 2, 1)},
        neuron_permutations={1: rng.permutation(24)}, vo_rotations={0: np.stack([random_rotation(8, s) for s in (5, 6)])})
    inv = ts.inverse()
    np.testing.assert_allclose(ts.residual_rotation @ inv.residual_rotation, np.eye(16), atol=1e-12)
    p, pinv = ts.neuron_permutations[1], inv.neuron_permutations[1]
    np.testing.assert_array_equal(p[pinv], np.arange(24))
    # V rows of kv head g after forward then inverse: R'_g-rotated copy of the forward head at
    # position pinv_kv[g], which is the original head g rotated by R_{pinv_kv[g]}: back to identity.
    kv, kv_inv = ts.head_permutations[0].kv_perm, inv.head_permutations[0].kv_perm
    for j in range(2):
        r_fwd = ts.vo_rotations[0][kv_inv[j]]
        np.testing.assert_allclose(r_fwd @ inv.vo_rotations[0][j], np.eye(8), atol=1e-12)
        assert kv[kv_inv[j]] == j


# ----------------------------------------------------------------------------------------------
# bad specs: each a clear error naming the problem, and nothing written
# ----------------------------------------------------------------------------------------------
def bad_spec_cases():
    def non_orthogonal(d, cfg):
        return write_transform_spec(d, cfg, residual_rotation=random_rotation(128, 1) * 1.01)

    def wrong_shape(d, cfg):
        return write_transform_spec(d, cfg, residual_rotation=random_rotation(64, 1))

    def not_a_permutation(d, cfg):
        return write_transform_spec(d, cfg, neuron_permutations={0: np.r_[np.arange(255), 3]})

    def gqa_breaking(d, cfg):
        return write_transform_spec(d, cfg, head_permutations={1: np.array([0, 2, 1, 3])})

    def head_dim_mismatch(d, cfg):
        spec = write_transform_spec(d, cfg, neuron_permutations={0: np.arange(256)})
        raw = json.loads(spec.read_text())
        raw["layers"][0]["head_dim"] = 64
        spec.write_text(json.dumps(raw))
        return spec

    def missing_file(d, cfg):
        spec = write_transform_spec(d, cfg, residual_rotation=random_rotation(128, 1))
        (d / "rotations" / "global.safetensors").unlink()
        return spec

    def escaping_path(d, cfg):
        outside = d.parent / f"outside-{d.name}"
        outside.mkdir()
        save_file({"rotation": random_rotation(128, 1)}, str(outside / "q.safetensors"))
        spec = d / "transforms.json"
        spec.write_text(json.dumps({"version": 1, "residual_rotation_path": f"../{outside.name}/q.safetensors",
                                    "layers": []}))
        return spec

    def unknown_layer(d, cfg):
        spec = write_transform_spec(d, cfg, neuron_permutations={0: np.arange(256)})
        raw = json.loads(spec.read_text())
        raw["layers"][0]["name"] = "model.layers.7"
        spec.write_text(json.dumps(raw))
        return spec

    def unknown_key(d, cfg):
        (d / "transforms.json").write_text(json.dumps({"layers": [{"name": "model.layers.0", "qk_path": "x"}]}))
        return d / "transforms.json"

    def wrong_model_type(d, cfg):
        (d / "transforms.json").write_text(json.dumps({"model_type": "llama", "layers": []}))
        return d / "transforms.json"

    def wrong_tensor_key(d, cfg):
        save_file({"perm": np.arange(256)}, str(d / "p.safetensors"))
        (d / "transforms.json").write_text(json.dumps(
            {"layers": [{"name": "model.layers.0", "neuron_permutation_path": "p.safetensors"}]}))
        return d / "transforms.json"

    def kv_permutation_disagrees(d, cfg):
        save_file({"permutation": np.array([2, 3, 0, 1]), "kv_permutation": np.array([0, 1])},
                  str(d / "h.safetensors"))
        (d / "transforms.json").write_text(json.dumps(
            {"layers": [{"name": "model.layers.0", "head_permutation_path": "h.safetensors"}]}))
        return d / "transforms.json"

    def not_json(d, cfg):
        (d / "transforms.json").write_text("{layers: [")
        return d / "transforms.json"

    return {
        "non_orthogonal": (non_orthogonal, BadInputError, r"global.safetensors.*not orthogonal: max\|QᵀQ − I\| = 0.0201"),
        "wrong_shape": (wrong_shape, BadInputError, r"shape \[64, 64\], expected \[128, 128\]"),
        "not_a_permutation": (not_a_permutation, BadInputError,
                              r"model.layers.0.mlp.safetensors.*not a permutation of 0..255 \(missing \[255\], repeated \[3\]\)"),
        "gqa_breaking": (gqa_breaking, NotExactError, r"model.layers.1.heads.safetensors.*breaks the GQA groups"),
        "head_dim_mismatch": (head_dim_mismatch, BadInputError, r"layers\[0\] \(model.layers.0\) head_dim=64.*head_dim=32"),
        "missing_file": (missing_file, BadInputError, r"residual_rotation_path.*'rotations/global.safetensors' not found"),
        "escaping_path": (escaping_path, BadInputError, r"outside the run directory.*--allow-outside-paths"),
        "unknown_layer": (unknown_layer, BadInputError, r"'model.layers.7' is not a decoder block"),
        "unknown_key": (unknown_key, BadInputError, r"unknown transform key\(s\) \['qk_path'\]"),
        "wrong_model_type": (wrong_model_type, BadInputError, r"model_type 'llama' does not match.*'qwen3'"),
        "wrong_tensor_key": (wrong_tensor_key, BadInputError, r"p.safetensors has no tensor 'permutation'.*\['perm'\]"),
        "kv_permutation_disagrees": (kv_permutation_disagrees, BadInputError, r"'kv_permutation' \[0, 1\] disagrees.*\[1, 0\]"),
        "not_json": (not_json, BadInputError, r"transforms.json: not valid JSON"),
    }


CASES = bad_spec_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_is_a_clear_error_and_writes_nothing(make_tiny, tmp_path, case):
    make, exc, pattern = CASES[case]
    model_dir = make_tiny("qwen3")
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    spec = make(run, config_of(model_dir))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = run / "checkpoints" / "rotated"
    with pytest.raises(exc, match=pattern):
        prepare_fold(str(model_dir), spec, out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_outside_paths_allowed_on_request(make_tiny, tmp_path):
    model_dir = make_tiny("qwen3")
    (tmp_path / "run").mkdir()
    spec = CASES["escaping_path"][0](tmp_path / "run", config_of(model_dir))
    plan = prepare_fold(str(model_dir), spec, tmp_path / "out", allow_outside_paths=True)
    assert plan["exact"] and plan["transforms"]["residual_rotation"] and not (tmp_path / "out").exists()


def test_run_dir_is_the_root_for_specs_in_subfolders(make_tiny, tmp_path):
    """A spec in runs/x/transports/ may reference runs/x/rotations/ (the run dir holds ledgers/)."""
    model_dir = make_tiny("qwen3")
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    (run / "transports").mkdir()
    (run / "rot").mkdir()
    save_file({"rotation": random_rotation(128, 2)}, str(run / "rot" / "q.safetensors"))
    spec = run / "transports" / "transforms.json"
    spec.write_text(json.dumps({"residual_rotation_path": "../rot/q.safetensors", "layers": []}))
    assert WeightTransformSet.from_spec(spec, config_of(model_dir)).exact


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_can_never_be_the_source(make_tiny, tmp_path, where):
    model_dir = make_tiny("qwen3")
    spec = write_transform_spec(tmp_path, config_of(model_dir), residual_rotation=random_rotation(128, 1))
    out = model_dir if where == "same" else model_dir.parent
    with pytest.raises(BadInputError, match="source checkpoint"):
        prepare_fold(str(model_dir), spec, out)


def test_missing_checkpoint_and_hub_id_offline(tmp_path):
    spec = tmp_path / "transforms.json"
    spec.write_text('{"layers": []}')
    with pytest.raises(BadInputError, match="local model folder not found"):
        prepare_fold(str(tmp_path / "nope" / "x" / "y"), spec, tmp_path / "out")
    with pytest.raises(BadInputError, match=r"'Qwen/Qwen2.5-7B-Instruct'.*not in the HF cache"):
        prepare_fold("Qwen/Qwen2.5-7B-Instruct", spec, tmp_path / "out", hf_hub_cache=str(tmp_path / "cache"))


def test_orthogonality_error_is_measured():
    q = random_rotation(32, 0)
    assert orthogonality_error(q) < 1e-13
    assert abs(orthogonality_error(q * 1.1) - 0.21) < 1e-9
