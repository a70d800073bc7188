"""The rotate job end to end through real shard folders (lib.transport.record.run_rotation): streaming R
vs scipy, planted rotations/reflections, pooling, PCA across widths, position 0, padding,
ledgers, transforms.json, and bad inputs that must write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from lib.core.errors import BadInputError, ChecksumError
from lib.store.ledgers import APPEND_FIELD, SCHEMAS
from lib.store.safetensors_io import load_tensors
from lib.testing.synthetic import SyntheticSample, write_capture_from_arrays
from lib.transport.options import RotateOptions
from lib.transport.plan import plan_rotation
from lib.transport.record import run_rotation
from lib.transport.stats import CrossMoments

L0, L1 = "model.layers.0", "model.layers.1"


def make_pair(tmp: Path, layers: dict[str, tuple], lens=(7, 23, 1, 40, 12), dtype=None, seed=0, teacher_texts=None,
              teacher_ids=None):
    """Student/teacher captures with the given {layer: (student [N, d_s], teacher [N, d_t])} rows
    split into samples of `lens` tokens. Returns (student index, teacher index)."""
    rng = np.random.default_rng(seed)
    s_samples, t_samples, start = [], [], 0
    for i, n in enumerate(lens):
        ids = rng.integers(0, 500, n)
        sl = slice(start, start + n)
        s_samples.append(SyntheticSample(f"text {i}", ids, {k: v[0][sl] for k, v in layers.items()}))
        t_text = teacher_texts[i] if teacher_texts else f"text {i}"
        t_ids = teacher_ids[i] if teacher_ids and i in teacher_ids else ids
        t_samples.append(SyntheticSample(t_text, t_ids, {k: v[1][sl] for k, v in layers.items()}))
        start += n
    return (write_capture_from_arrays(tmp / "student", s_samples, dtype=dtype),
            write_capture_from_arrays(tmp / "teacher", t_samples, dtype=dtype))


def rows(n, d, seed, scale=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * (scale if scale is not None else np.linspace(0.5, 2.0, d))


def rotation(d, seed, reflect=False):
    r = ortho_group.rvs(d, random_state=seed)
    if (np.linalg.det(r) < 0) != reflect:
        r[:, 0] *= -1
    return r


def test_streaming_rotation_equals_scipy_procrustes_on_concatenated_tokens(tmp_path):
    n, d = 83, 24
    x0, x1 = rows(n, d, 1), rows(n, d, 2)
    y0 = x0 @ rotation(d, 3) + 0.4 * rows(n, d, 4, 1.0)
    y1 = x1 @ rotation(d, 5) + 0.4 * rows(n, d, 6, 1.0)
    s, t = make_pair(tmp_path, {L0: (x0, y0), L1: (x1, y1)}, dtype="float32")
    res = run_rotation(s, t, [L0, L1], tmp_path / "rot", options=RotateOptions(cosine_tokens=0, chunk_rows=16))
    # the oracle sees exactly the stored (float32) values, concatenated, in float64
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    xs, ys = [f32(x0), f32(x1)], [f32(y0), f32(y1)]
    for i, row in enumerate(res["layers"]):
        r = load_tensors(row["rotation_path"])[0]["rotation"]
        ref, _ = orthogonal_procrustes(xs[i], ys[i])
        assert np.max(np.abs(r - ref)) <= 1e-8
        xr, y = xs[i] @ ref, ys[i]
        cos = np.sum(xr * y, 1) / (np.linalg.norm(xr, axis=1) * np.linalg.norm(y, axis=1))
        before = np.sum(xs[i] * y, 1) / (np.linalg.norm(xs[i], axis=1) * np.linalg.norm(y, axis=1))
        assert abs(row["cosine_after"] - cos.mean()) <= 1e-10 and row["n_cosine_tokens"] == n
        assert abs(row["cosine_before"] - before.mean()) <= 1e-10
        assert np.isclose(row["fit_residual"], np.sum((xr - y) ** 2) / np.sum(y * y), rtol=1e-8)
        assert row["n_tokens"] == n and row["cosine_after"] > row["cosine_before"] + 0.3
    # the one pooled rotation = Procrustes on both layers' tokens stacked (equal weights)
    q = load_tensors(res["global"]["rotation_path"])[0]["rotation"]
    ref_q, _ = orthogonal_procrustes(np.vstack(xs), np.vstack(ys))
    assert np.max(np.abs(q - ref_q)) <= 1e-8
    for i, row in enumerate(res["layers"]):
        xq = xs[i] @ ref_q
        cos_q = np.mean(np.sum(xq * ys[i], 1) / (np.linalg.norm(xq, axis=1) * np.linalg.norm(ys[i], axis=1)))
        assert abs(row["cosine_global"] - cos_q) <= 1e-10
        r = load_tensors(row["rotation_path"])[0]["rotation"]
        assert np.isclose(row["dist_to_global"], np.linalg.norm(r - q))
        assert row["cosine_global"] < row["cosine_after"]  # per-layer R fits its own layer better
    # stats on disk are the moments of the same rows (full Sx, Sy only when asked for)
    m = CrossMoments.load(res["layers"][0]["stats_path"])
    np.testing.assert_allclose(m.cross, xs[0].T @ ys[0], rtol=1e-12, atol=1e-9)
    assert m.gram_x is None and np.isclose(m.sq_x, np.sum(xs[0] ** 2))
    full = run_rotation(s, t, [L0], tmp_path / "full", options=RotateOptions(full_moments=True))
    m = CrossMoments.load(full["layers"][0]["stats_path"])
    np.testing.assert_allclose(m.gram_x, xs[0].T @ xs[0], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m.gram_y, ys[0].T @ ys[0], rtol=1e-12, atol=1e-9)


def test_weights_and_normalized_pooling_match_the_weighted_stack(tmp_path):
    n, d = 60, 10
    x0, x1 = rows(n, d, 1), rows(n, d, 2) * 10
    y0, y1 = x0 @ rotation(d, 3) + rows(n, d, 4, 0.5), x1 @ rotation(d, 5) + rows(n, d, 6, 5.0)
    s, t = make_pair(tmp_path, {L0: (x0, y0), L1: (x1, y1)}, dtype="float64", lens=(30, 30))
    res = run_rotation(s, t, [L0, L1], tmp_path / "a", options=RotateOptions(layer_weights=((L0, 3.0),)))
    q = load_tensors(res["global"]["rotation_path"])[0]["rotation"]
    ref, _ = orthogonal_procrustes(np.vstack([np.sqrt(3) * x0, x1]), np.vstack([np.sqrt(3) * y0, y1]))
    assert np.max(np.abs(q - ref)) <= 1e-8
    res = run_rotation(s, t, [L0, L1], tmp_path / "b", options=RotateOptions(pool_scale="normalized"))
    q = load_tensors(res["global"]["rotation_path"])[0]["rotation"]
    w0 = 1 / np.sqrt(np.sum(x0 ** 2) * np.sum(y0 ** 2))
    w1 = 1 / np.sqrt(np.sum(x1 ** 2) * np.sum(y1 ** 2))
    ref, _ = orthogonal_procrustes(np.vstack([np.sqrt(w0) * x0, np.sqrt(w1) * x1]),
                                   np.vstack([np.sqrt(w0) * y0, np.sqrt(w1) * y1]))
    assert np.max(np.abs(q - ref)) <= 1e-8


@pytest.mark.parametrize("reflect", [False, True])
def test_planted_rotation_or_reflection_is_recovered_from_exact_data(tmp_path, reflect):
    d = 32
    r_true = rotation(d, 11, reflect)
    x0, x1 = rows(150, d, 1), rows(150, d, 2, 3.0)
    s, t = make_pair(tmp_path, {L0: (x0, x0 @ r_true), L1: (x1, x1 @ r_true)}, dtype="float64",
                     lens=(50, 60, 40))
    res = run_rotation(s, t, None, tmp_path / "rot", options=RotateOptions(cosine_tokens=40))
    for row in res["layers"]:
        r = load_tensors(row["rotation_path"])[0]["rotation"]
        assert np.max(np.abs(r - r_true)) <= 1e-6
        assert row["fit_residual"] <= 1e-12 and abs(row["cosine_after"] - 1) <= 1e-10
        assert row["n_cosine_tokens"] == 38  # every 4th of 150 tokens: the cap is honoured
    q = load_tensors(res["global"]["rotation_path"])[0]["rotation"]
    assert np.max(np.abs(q - r_true)) <= 1e-6
    assert res["global"]["det"] == (-1.0 if reflect else 1.0)


def test_excluding_position0_drops_exactly_those_rows(tmp_path):
    d, lens = 8, (5, 9, 6)
    x = rows(sum(lens), d, 1)
    r_true = rotation(d, 2)
    y = x @ r_true
    starts = np.cumsum((0,) + lens[:-1])
    y[starts] = 1e6 * rows(len(lens), d, 3)  # attention-sink rows that fit nothing
    s, t = make_pair(tmp_path, {L0: (x, y)}, lens=lens, dtype="float64")
    res = run_rotation(s, t, [L0], tmp_path / "rot", ledger=tmp_path / "l.jsonl",
                       options=RotateOptions(exclude_position0=True))
    row = res["layers"][0]
    assert row["n_tokens"] == sum(lens) - len(lens)
    assert np.max(np.abs(load_tensors(row["rotation_path"])[0]["rotation"] - r_true)) <= 1e-8
    ledger = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert ledger[0]["excluded_position0"] is True and ledger[0]["n_tokens"] == row["n_tokens"]
    # negative control: with position 0 included the sinks wreck the fit
    res = run_rotation(s, t, [L0], tmp_path / "rot2")
    assert np.max(np.abs(load_tensors(res["layers"][0]["rotation_path"])[0]["rotation"] - r_true)) > 0.1


def test_padded_positions_never_enter_the_statistics(make_tiny, tmp_path):
    """Captured in padded batches; the moments must equal HF's own unpadded forwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import Sample

    texts = ["Bondi.", "The Sydney Opera House rises over Bennelong Point like a fleet of sails.",
             "故宫是明清两代的皇家宫殿。", "Uluru glows red at dusk."]
    student, teacher = make_tiny("qwen3"), make_tiny("qwen3", seed=1)
    samples = [Sample(i, f"t{i}", t) for i, t in enumerate(texts)]
    for who, model in (("s", student), ("t", teacher)):
        run_capture(CaptureSpec(model=str(model), hook_points=(L0,), logits=False, batch_size=4), samples, tmp_path / who)
    res = run_rotation(tmp_path / "s", tmp_path / "t", [L0], tmp_path / "rot", options=RotateOptions(cosine_tokens=0))
    tok = AutoTokenizer.from_pretrained(student)
    hidden = {}
    for who, model in (("s", student), ("t", teacher)):
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        with torch.inference_mode():
            hidden[who] = [m(input_ids=torch.tensor([tok(t)["input_ids"]]), output_hidden_states=True)
                           .hidden_states[1][0].double().numpy() for t in texts]
    x, y = np.concatenate(hidden["s"]), np.concatenate(hidden["t"])
    stats = CrossMoments.load(res["layers"][0]["stats_path"])
    assert stats.n == len(x) == sum(len(tok(t)["input_ids"]) for t in texts)
    np.testing.assert_allclose(stats.cross, x.T @ y, rtol=1e-4, atol=1e-3 * np.abs(x.T @ y).max())
    np.testing.assert_allclose(stats.sum_x, x.sum(0), rtol=1e-4, atol=1e-4 * np.abs(x).sum())


def test_different_widths_need_pca_and_give_a_foldable_completion_and_adapter(tmp_path):
    n, ds, dt, k = 240, 20, 12, 5
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, k)) * np.array([5.0, 4.0, 3.0, 2.0, 1.5])
    a_s, a_t = np.linalg.qr(rng.standard_normal((ds, k)))[0], np.linalg.qr(rng.standard_normal((dt, k)))[0]
    layers = {}
    r = rotation(k, 10)
    for i, name in enumerate((L0, L1)):
        mx, my = rng.standard_normal(ds), rng.standard_normal(dt)
        layers[name] = (z @ a_s.T + mx, z @ r @ a_t.T + my)
    s, t = make_pair(tmp_path, layers, dtype="float64", lens=(100, 140))
    with pytest.raises(BadInputError, match=r"hidden size is 20 and the teacher's 12: pass --pca-dim"):
        run_rotation(s, t, None, tmp_path / "rot")
    with pytest.raises(BadInputError, match=r"--pca-dim 13 is larger than the teacher's width 12"):
        run_rotation(s, t, None, tmp_path / "rot", options=RotateOptions(pca_dim=13))
    assert not (tmp_path / "rot").exists()
    res = run_rotation(s, t, None, tmp_path / "rot", options=RotateOptions(pca_dim=k), spec_out=tmp_path / "tf.json")
    for row in res["layers"]:
        assert row["kind"] == "pca-procrustes" and row["pca_dim"] == k and row["cosine_before"] is None
        assert row["cosine_after"] > 1 - 1e-10 and row["fit_residual"] < 1e-12
        assert row["n_cosine_tokens"] == n
        f = load_tensors(row["rotation_path"])[0]
        assert f["rotation"].shape == (ds, ds) and f["student_basis"].shape == (ds, k)
        assert np.allclose(f["rotation"].T @ f["rotation"], np.eye(ds), atol=1e-12)
    g = load_tensors(res["global"]["rotation_path"])[0]
    q = g["rotation"]
    assert q.shape == (ds, ds) and np.allclose(q.T @ q, np.eye(ds), atol=1e-12)
    ad = load_tensors(res["global"]["qa_adapter_path"])[0]
    assert ad["projection"].shape == (ds, dt) and ad["student_mean"].shape == (2, ds)
    # Both layers share the bases and the k-space rotation (only their means differ), so the
    # pooled map is exact too; the adapter maps the
    # folded student x @ Q onto the teacher.
    for i, name in enumerate((L0, L1)):
        x, y = layers[name]
        y_hat = (x @ q - ad["student_mean"][i]) @ ad["projection"] + ad["teacher_mean"][i]
        assert np.max(np.abs(y_hat - y)) <= 1e-8
        assert res["layers"][i]["cosine_global"] > 1 - 1e-10
    spec = json.loads((tmp_path / "tf.json").read_text())
    assert spec["residual_rotation_path"] == "rot/global.safetensors"
    assert spec["provenance"]["qa_adapter"] == "rot/global.qa_adapter.safetensors"


def test_ledger_rows_are_appended_never_rewritten_jsonl_and_parquet(tmp_path):
    x = rows(40, 6, 1)
    s, t = make_pair(tmp_path, {L0: (x, x @ rotation(6, 2)), L1: (x, x)}, lens=(20, 20))
    jl = tmp_path / "rotations.jsonl"
    first = run_rotation(s, t, None, tmp_path / "rot", ledger=jl)
    before = jl.read_bytes()
    second = run_rotation(s, t, None, tmp_path / "rot", ledger=jl)
    after = jl.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    lines = [json.loads(x) for x in after.decode().splitlines()]
    assert [r["run_id"] for r in lines] == [first["run_id"]] * 2 + [second["run_id"]] * 2
    assert [r["layer"] for r in lines] == [L0, L1, L0, L1] and first["run_id"] != second["run_id"]
    assert set(lines[0]) == set(SCHEMAS["rotations"].names) | {APPEND_FIELD}  # + the append's key

    pf = tmp_path / "ledgers" / "rotations.parquet"
    run_rotation(s, t, None, tmp_path / "rot", ledger=pf, run_id="a")
    parts = sorted(pf.glob("part-*.parquet"))
    snapshot = {p: p.read_bytes() for p in parts}
    run_rotation(s, t, None, tmp_path / "rot", ledger=pf, run_id="b")
    assert {p: p.read_bytes() for p in parts} == snapshot and len(list(pf.glob("part-*.parquet"))) == 2
    df = pd.read_parquet(pf)
    assert sorted(df["run_id"]) == ["a", "a", "b", "b"]
    assert pq.read_schema(next(pf.glob("part-*.parquet"))).remove_metadata() == SCHEMAS["rotations"]
    assert df["pca_dim"].isna().all() and df["n_tokens"].dtype == np.int64
    assert np.allclose(df.loc[df.layer == L1, "cosine_before"], 1.0)
    assert json.loads(df["top_singular_values"].iloc[0])[0] > 0


# ----------------------------------------------------------------------------------------------
# bad inputs: a clear error each, and nothing written
# ----------------------------------------------------------------------------------------------
def _missing_index(tmp, s, t):
    return dict(student_index=tmp / "nope" / "metadata.jsonl"), BadInputError, "index file not found"


def _malformed_index(tmp, s, t):
    lines = s.read_text().splitlines()
    lines[1] = lines[1][:40]
    s.write_text("\n".join(lines) + "\n")
    return {}, BadInputError, r"metadata.jsonl:2: malformed JSON"


def _layer_absent(tmp, s, t):
    return dict(layers=[L0, "model.layers.7"]), BadInputError, r"'model.layers.7' is not in the student capture"


def _layer_absent_teacher(tmp, s, t):
    return dict(layers=[L1]), BadInputError, r"'model.layers.1' is not in the teacher capture"


def _corrupt_shard(tmp, s, t):
    victim = t.parent / "sample_0001.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x40
    victim.write_bytes(bytes(raw))
    return {}, ChecksumError, "sample_0001.safetensors"


def _pca_too_big(tmp, s, t):
    return dict(options=RotateOptions(pca_dim=9)), BadInputError, "--pca-dim 9 is larger"


def _empty_intersection(tmp, s, t):
    return dict(teacher_index=tmp / "other" / "metadata.jsonl"), BadInputError, "no sample is in both captures"


def _mismatched_tokens(tmp, s, t):
    return dict(teacher_index=tmp / "retok" / "metadata.jsonl"), BadInputError, r"sample 'synthetic:1'.*position 3"


BAD = [_missing_index, _malformed_index, _layer_absent, _layer_absent_teacher, _corrupt_shard, _pca_too_big,
       _empty_intersection, _mismatched_tokens]


@pytest.mark.parametrize("case", BAD, ids=lambda f: f.__name__.strip("_"))
def test_bad_inputs_raise_a_clear_error_and_write_nothing(tmp_path, case):
    x = rows(30, 8, 1)
    s, t = make_pair(tmp_path, {L0: (x, x)}, lens=(10, 10, 10))
    # the teacher lacks model.layers.1 (the student has it)
    write_capture_from_arrays(tmp_path / "student2", [SyntheticSample(f"text {i}", np.arange(10), {L0: x[:10], L1: x[:10]})
                                                      for i in range(3)])
    write_capture_from_arrays(tmp_path / "other", [SyntheticSample("unrelated", np.arange(10), {L0: x[:10]})])
    ids = [np.asarray(load_tensors(t.parent / f"sample_{i:04d}.safetensors")[0]["input_ids"]) for i in range(3)]
    ids[1] = ids[1].copy()
    ids[1][3] += 1
    write_capture_from_arrays(tmp_path / "retok", [SyntheticSample(f"text {i}", ids[i], {L0: x[10 * i:10 * i + 10]})
                                                   for i in range(3)])
    if case is _layer_absent_teacher:
        s = tmp_path / "student2" / "metadata.jsonl"
    kwargs, err, pattern = case(tmp_path, s, t)
    call = dict(student_index=s, teacher_index=t, layers=[L0], output_dir=tmp_path / "out",
                ledger=tmp_path / "ledger.jsonl", spec_out=tmp_path / "transforms.json", options=RotateOptions())
    call.update(kwargs)
    with pytest.raises(err, match=pattern):
        run_rotation(call.pop("student_index"), call.pop("teacher_index"), call.pop("layers"), call.pop("output_dir"),
                     **call)
    for p in ("out", "ledger.jsonl", "transforms.json"):
        assert not (tmp_path / p).exists(), f"{p} written despite bad input"


def test_truncated_side_pairs_its_prefix_and_weights_are_checked(tmp_path):
    x = rows(20, 4, 1)
    ids = np.arange(20)
    write_capture_from_arrays(tmp_path / "s", [SyntheticSample("a", ids, {L0: x})])
    write_capture_from_arrays(tmp_path / "t", [SyntheticSample("a", ids[:12], {L0: x[:12]}, truncated=True)])
    plan = plan_rotation(tmp_path / "s", tmp_path / "t", None, tmp_path / "rot")
    assert plan.n_tokens == 12 and plan.layers == (L0,)
    with pytest.raises(BadInputError, match="not among the --layer"):
        plan_rotation(tmp_path / "s", tmp_path / "t", None, tmp_path / "rot",
                      options=RotateOptions(layer_weights=(("model.layers.9", 1.0),)))
    write_capture_from_arrays(tmp_path / "t2", [SyntheticSample("a", ids[:12], {L0: x[:12]})])
    with pytest.raises(BadInputError, match="not marked truncated"):
        plan_rotation(tmp_path / "s", tmp_path / "t2", None, tmp_path / "rot")
    with pytest.raises(BadInputError, match="--ledger"):
        plan_rotation(tmp_path / "s", tmp_path / "t", None, tmp_path / "rot", ledger=tmp_path / "l.csv")
