"""QA metrics against float64 numpy/scipy references on hand-made tensors and shard folders.

Run: `.venv/bin/python -m pytest tests/lib/test_metrics.py -q`
"""

from __future__ import annotations

import json

import lib.qa.token_metrics as metrics_mod
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.special import log_softmax, rel_entr, softmax
from scipy.stats import ortho_group

from lib.core.digests import sha256_text
from lib.core.errors import BadInputError
from lib.qa.compare import compare_captures, measure_capture
from lib.qa.token_metrics import compute_rms, compute_token_cosine, compute_token_kl, compute_token_surprisal
from lib.store.shards import ACT_PREFIX, commit_shards, make_payload_record, serialize_shard, shard_name

LAYERS = ("model.layers.0", "model.layers.1")


def write_capture(folder, samples, dtype=torch.float32):
    """A real shard folder: samples = [(text, ids [T], logits [T,V] or None, {layer: [T,d]})]."""
    folder.mkdir(parents=True, exist_ok=True)
    items, start = [], 0
    for i, (text, ids, logits, acts) in enumerate(samples):
        tensors = {"input_ids": torch.as_tensor(np.asarray(ids), dtype=torch.int64)}
        if logits is not None:
            tensors["logits"] = torch.as_tensor(np.asarray(logits)).to(dtype)
        for layer, a in acts.items():
            tensors[ACT_PREFIX + layer] = torch.as_tensor(np.asarray(a)).to(dtype)
        n = len(ids)
        payload = serialize_shard(tensors, {"text": text})
        rec = make_payload_record(dict(
            shard=shard_name(i), sample_id=f"s:{i}", sample_index=i, text_sha256=sha256_text(text), token_start=start,
            token_end=start + n, n_tokens=n, truncated=False, layers=list(acts), dtype=str(dtype).removeprefix("torch."),
            shapes={k: list(v.shape) for k, v in tensors.items()}, model="hand", revision="hand", tokenizer="hand",
            backend="hand", capture_key=sha256_text(f"{folder}:{i}"), capture_version="1", logits=logits is not None),
            payload)
        items.append((rec, payload))
        start += n
    commit_shards(folder, items)
    return str(folder / "metadata.jsonl")


def rand_capture(rng, lens, vocab=23, d=32, texts=None):
    out = []
    for i, n in enumerate(lens):
        text = texts[i] if texts else f"blurb {i}"
        out.append((text, rng.integers(0, vocab, n), rng.standard_normal((n, vocab)) * 2,
                    {la: rng.standard_normal((n, d)) + 0.3 for la in LAYERS}))
    return out


def values(result, metric, layer=None, sample=None):
    hits = [v for v in result.values if v.metric == metric and v.layer == layer and v.sample == sample]
    assert len(hits) == 1, (metric, layer, sample, hits)
    return hits[0]


# ---------------------------------------------------------------------------------------------
# per-token functions vs float64 references
# ---------------------------------------------------------------------------------------------
def test_token_functions_match_float64_numpy(monkeypatch):
    rng = np.random.default_rng(0)
    t, v = rng.standard_normal((9, 37)) * 3, rng.standard_normal((9, 37)) * 3
    ids = rng.integers(0, 37, 9)
    ref_kl = rel_entr(softmax(t, -1), softmax(v, -1)).sum(-1)
    # fp32 inputs are upcast, not computed in fp32: the result equals the reference on the fp32 values
    t32, v32 = t.astype(np.float32), v.astype(np.float32)
    ref_kl32 = rel_entr(softmax(t32.astype(np.float64), -1), softmax(v32.astype(np.float64), -1)).sum(-1)
    np.testing.assert_allclose(compute_token_kl(t, v).numpy(), ref_kl, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(compute_token_kl(torch.from_numpy(t32), torch.from_numpy(v32)).numpy(), ref_kl32,
                               rtol=1e-12, atol=1e-14)
    ref_sp = -log_softmax(v, -1)[np.arange(8), ids[1:]]
    np.testing.assert_allclose(compute_token_surprisal(v, ids).numpy(), ref_sp, rtol=1e-12)
    # chunked evaluation (large vocabularies) gives the same numbers
    monkeypatch.setattr(metrics_mod, "_KL_CHUNK_ELEMENTS", 2 * 37)
    np.testing.assert_allclose(compute_token_kl(t, v).numpy(), ref_kl, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(compute_token_surprisal(v, ids).numpy(), ref_sp, rtol=1e-12)
    assert float(compute_token_kl(t, t).abs().max()) < 1e-14 and float(compute_token_kl(t, v).min()) > 0

    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    a[2] = 0.0  # a zero row has no direction: its cosine counts as 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_cos = np.nan_to_num((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    np.testing.assert_allclose(compute_token_cosine(a, b).numpy(), ref_cos, rtol=1e-12, atol=1e-15)
    assert compute_rms(b) == pytest.approx(np.sqrt(np.mean(b ** 2)), rel=1e-14)


def test_kl_handles_masked_vocabulary_entries():
    t = np.array([[0.0, 1.0, -np.inf], [2.0, 0.0, 1.0]])
    v = np.array([[0.5, 0.2, -np.inf], [1.0, 1.0, 1.0]])
    kl = compute_token_kl(t, v).numpy()
    ref = rel_entr(softmax(t, -1), softmax(v, -1)).sum(-1)
    assert np.isfinite(kl).all()
    np.testing.assert_allclose(kl, ref, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# streaming over shard folders
# ---------------------------------------------------------------------------------------------
def test_streamed_metrics_match_a_numpy_reference_over_paired_tokens(tmp_path):
    rng = np.random.default_rng(1)
    teacher = rand_capture(rng, [5, 8, 3, 6])
    variant = rand_capture(rng, [5, 8, 6])
    # pair by text: variant sample 2 is teacher sample 3, and is truncated to 4 tokens; teacher sample 2 is
    # unpaired; the variant shares the token ids (same tokenizer)
    variant[2] = (teacher[3][0], teacher[3][1][:4], variant[2][2][:4], {k: a[:4] for k, a in variant[2][3].items()})
    variant[0] = (teacher[0][0], teacher[0][1], *variant[0][2:])
    variant[1] = (teacher[1][0], teacher[1][1], *variant[1][2:])
    t_idx = write_capture(tmp_path / "t", teacher, torch.float64)
    v_idx = write_capture(tmp_path / "v", variant, torch.float64)
    res = compare_captures(t_idx, v_idx)
    assert res.n_pairs == 3 and res.n_unpaired_teacher == 1 and res.n_unpaired_variant == 0
    assert res.layers == list(LAYERS)

    pairs = [(teacher[0], variant[0]), (teacher[1], variant[1]), (teacher[3], variant[2])]
    kl_all, sp_all = [], []
    for (_, ids, tl, _), (_, _, vl, _) in pairs:
        n = len(vl)
        kl = rel_entr(softmax(tl[:n], -1), softmax(vl, -1)).sum(-1)
        kl_all.append(kl)
        sp_all.append(-log_softmax(vl[:n - 1], -1)[np.arange(n - 1), ids[1:n]])
    assert values(res, "logit_kl").value == pytest.approx(np.concatenate(kl_all).mean(), rel=1e-12)
    assert values(res, "logit_kl").n_tokens == 5 + 8 + 4
    assert values(res, "logit_kl", sample="s:1").value == pytest.approx(kl_all[1].mean(), rel=1e-12)
    assert values(res, "surprisal").value == pytest.approx(np.concatenate(sp_all).mean(), rel=1e-12)
    assert values(res, "perplexity").value == pytest.approx(np.exp(np.concatenate(sp_all).mean()), rel=1e-12)
    for layer in LAYERS:
        y = np.vstack([t[3][layer][:len(v[2])] for t, v in pairs])
        x = np.vstack([v[3][layer] for _, v in pairs])
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert values(res, "hidden_state_cosine", layer).value == pytest.approx(cos.mean(), rel=1e-12)
        rms_x, rms_y = np.sqrt(np.mean(x ** 2)), np.sqrt(np.mean(y ** 2))
        assert values(res, "residual_rms", layer).value == pytest.approx(rms_x, rel=1e-12)
        assert values(res, "residual_rms_ratio", layer).value == pytest.approx(rms_x / rms_y, rel=1e-12)

    own = measure_capture(t_idx)
    ref = np.concatenate([-log_softmax(tl[:-1], -1)[np.arange(len(ids) - 1), ids[1:]] for _, ids, tl, _ in teacher])
    assert values(own, "surprisal").value == pytest.approx(ref.mean(), rel=1e-12)
    all_y = np.vstack([t[3][LAYERS[1]] for t in teacher])
    assert values(own, "residual_rms", LAYERS[1]).value == pytest.approx(np.sqrt(np.mean(all_y ** 2)), rel=1e-12)
    assert not [v for v in own.values if v.metric in ("logit_kl", "hidden_state_cosine", "residual_rms_ratio")]


def test_identical_captures_give_kl_0_cosine_1_rms_ratio_1(tmp_path):
    rng = np.random.default_rng(2)
    samples = rand_capture(rng, [7, 4, 9])
    t_idx = write_capture(tmp_path / "t", samples)
    v_idx = write_capture(tmp_path / "v", samples)  # a separate capture of the same model
    res = compare_captures(t_idx, v_idx)
    assert values(res, "logit_kl").value == 0.0
    for layer in LAYERS:
        assert values(res, "hidden_state_cosine", layer).value == pytest.approx(1.0, abs=1e-12)
        assert values(res, "residual_rms_ratio", layer).value == pytest.approx(1.0, abs=1e-12)
    assert values(res, "surprisal").value == pytest.approx(values(measure_capture(t_idx), "surprisal").value, rel=1e-15)


def test_rotated_copy_needs_its_rotation(tmp_path):
    """A variant whose residual is the teacher's in a rotated basis: raw cosine ≈ 0, with the
    solved rotation (x @ Q, Q = Pᵀ) cosine = 1 to fp32 tolerance; RMS is basis-free."""
    rng = np.random.default_rng(3)
    d = 64
    p = ortho_group.rvs(d, random_state=4)
    teacher = rand_capture(rng, [12, 20, 9], d=d)
    variant = [(txt, ids, lg, {k: a @ p for k, a in acts.items()}) for txt, ids, lg, acts in teacher]
    t_idx = write_capture(tmp_path / "t", teacher)
    v_idx = write_capture(tmp_path / "v", variant)
    save_file({"rotation": p.T.copy()}, str(tmp_path / "q.safetensors"))
    raw = compare_captures(t_idx, v_idx)
    aligned = compare_captures(t_idx, v_idx, transports=[("rotation", str(tmp_path / "q.safetensors"))])
    for layer in LAYERS:
        assert abs(values(raw, "hidden_state_cosine", layer).value) < 0.15
        assert values(aligned, "hidden_state_cosine", layer).value == pytest.approx(1.0, abs=1e-6)
        assert values(raw, "residual_rms_ratio", layer).value == pytest.approx(1.0, abs=1e-6)
    # negative control: the wrong rotation (P itself) does not align
    save_file({"rotation": p.copy()}, str(tmp_path / "wrong.safetensors"))
    wrong = compare_captures(t_idx, v_idx, transports=[("rotation", str(tmp_path / "wrong.safetensors"))])
    assert values(wrong, "hidden_state_cosine", LAYERS[0]).value < 0.5


def test_permutation_and_pca_adapter_transports(tmp_path):
    rng = np.random.default_rng(5)
    d_t, d_s, k = 24, 16, 6
    teacher = rand_capture(rng, [10, 7], d=d_t)
    perm = rng.permutation(d_t)
    inv = np.argsort(perm)
    # the variant stores the teacher's units in another order: variant[:, j] = teacher[:, inv[j]]
    permuted = [(txt, ids, lg, {la: a[:, inv] for la, a in acts.items()}) for txt, ids, lg, acts in teacher]
    save_file({"permutation": perm.astype(np.int64)}, str(tmp_path / "perm.safetensors"))
    t_idx = write_capture(tmp_path / "t", teacher, torch.float64)
    p_idx = write_capture(tmp_path / "p", permuted, torch.float64)
    res = compare_captures(t_idx, p_idx, metrics=["hidden_state_cosine"],
                           transports=[("permutation", str(tmp_path / "perm.safetensors"))])
    assert values(res, "hidden_state_cosine", LAYERS[0]).value == pytest.approx(1.0, abs=1e-12)

    # PCA adapter between widths 16 → 24 with per-layer means (metadata "layers"), checked
    # against the formula evaluated in numpy
    narrow = rand_capture(rng, [10, 7], d=d_s)
    narrow = [(t[0], t[1], n[2], n[3]) for t, n in zip(teacher, narrow, strict=True)]
    bs, _ = np.linalg.qr(rng.standard_normal((d_s, k)))
    bt, _ = np.linalg.qr(rng.standard_normal((d_t, k)))
    rk = ortho_group.rvs(k, random_state=6)
    mu_s, mu_t = rng.standard_normal((2, d_s)), rng.standard_normal((2, d_t))
    save_file({"student_basis": bs, "teacher_basis": bt, "k_rotation": rk, "student_mean": mu_s, "teacher_mean": mu_t},
              str(tmp_path / "pca.safetensors"), metadata={"layers": json.dumps(list(LAYERS))})
    n_idx = write_capture(tmp_path / "n", narrow, torch.float64)
    res = compare_captures(t_idx, n_idx, metrics=["hidden_state_cosine"],
                           transports=[("pca_adapter", str(tmp_path / "pca.safetensors"))])
    for li, layer in enumerate(LAYERS):
        x = np.vstack([s[3][layer] for s in narrow])
        y = np.vstack([s[3][layer] for s in teacher])
        xh = ((x - mu_s[li]) @ bs @ rk) @ bt.T + mu_t[li]
        ref = ((xh * y).sum(1) / (np.linalg.norm(xh, axis=1) * np.linalg.norm(y, axis=1))).mean()
        assert values(res, "hidden_state_cosine", layer).value == pytest.approx(ref, rel=1e-12)
    # without an adapter the widths cannot be compared: a clear error, not a number
    with pytest.raises(BadInputError, match="pca_adapter"):
        compare_captures(t_idx, n_idx, metrics=["hidden_state_cosine"])
    # ...but KL/surprisal need no common residual basis
    kl_only = compare_captures(t_idx, n_idx, metrics=["logit_kl"])
    assert [v.metric for v in kl_only.values if v.sample is None] == ["logit_kl"]


def test_bad_inputs_are_named(tmp_path):
    rng = np.random.default_rng(7)
    teacher = rand_capture(rng, [6, 5])
    t_idx = write_capture(tmp_path / "t", teacher)
    other_ids = [(txt, (ids + 1) % 23, lg, acts) for txt, ids, lg, acts in teacher]
    o_idx = write_capture(tmp_path / "o", other_ids)
    with pytest.raises(BadInputError, match=r"sample s:0: token ids differ at position 0"):
        compare_captures(t_idx, o_idx)
    save_file({"rotation": np.eye(8)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(BadInputError, match=r"small.safetensors expects residual width 8, but the variant gives 32"):
        compare_captures(t_idx, t_idx, transports=[("rotation", str(tmp_path / "small.safetensors"))])
    save_file({"permutation": np.array([0, 0, 1], dtype=np.int64)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BadInputError, match="is not a permutation"):
        compare_captures(t_idx, t_idx, transports=[("permutation", str(tmp_path / "bad.safetensors"))])
    no_logits = [(txt, ids, None, acts) for txt, ids, _, acts in teacher]
    n_idx = write_capture(tmp_path / "n", no_logits)
    with pytest.raises(BadInputError, match="lack logits"):
        compare_captures(t_idx, n_idx)
    assert compare_captures(t_idx, n_idx, metrics=["hidden_state_cosine"]).n_pairs == 2
    unrelated = write_capture(tmp_path / "u", rand_capture(rng, [4], texts=["another text"]))
    with pytest.raises(BadInputError, match="share no sample"):
        compare_captures(t_idx, unrelated)
    with pytest.raises(BadInputError, match="unknown metric"):
        compare_captures(t_idx, t_idx, metrics=["bleu"])


def test_solver_pca_files_give_the_solvers_own_cosines(tmp_path):
    """Contract with `tourguide rotate --pca-dim`: its global.safetensors (unfolded student) and
    global.qa_adapter.safetensors (student folded with the square completion) as pca_adapter
    transports reproduce the mean cosines the solver recorded in its ledger."""
    from safetensors.numpy import load_file

    from lib.testing.synthetic import SyntheticSample, write_capture_from_arrays
    from lib.transport.options import RotateOptions
    from lib.transport.record import run_rotation

    rng = np.random.default_rng(8)
    d_s, d_t = 24, 32
    w = rng.standard_normal((d_s, d_t))
    s_samples, t_samples, folded = [], [], []
    for i, n in enumerate([10, 14, 9]):
        ids = rng.integers(0, 50, n)
        xs = {la: rng.standard_normal((n, d_s)) + 1.0 for la in LAYERS}
        s_samples.append(SyntheticSample(f"t{i}", ids, xs))
        t_samples.append(SyntheticSample(f"t{i}", ids, {la: x @ w + 0.1 * rng.standard_normal((n, d_t))
                                                        for la, x in xs.items()}))
    s = write_capture_from_arrays(tmp_path / "s", s_samples, dtype="float64")
    t = write_capture_from_arrays(tmp_path / "t", t_samples, dtype="float64")
    run_rotation(s, t, list(LAYERS), tmp_path / "rot", ledger=str(tmp_path / "rot.jsonl"),
                 options=RotateOptions(pca_dim=8, cosine_tokens=0))
    ledger = {r["layer"]: r for r in map(json.loads, (tmp_path / "rot.jsonl").read_text().splitlines())}
    unfolded = compare_captures(t, s, metrics=["hidden_state_cosine"],
                                transports=[("pca_adapter", str(tmp_path / "rot" / "global.safetensors"))])
    q = load_file(str(tmp_path / "rot" / "global.safetensors"))["rotation"]
    for smp in s_samples:
        folded.append(SyntheticSample(smp.text, smp.input_ids, {la: x @ q for la, x in smp.acts.items()}))
    f = write_capture_from_arrays(tmp_path / "f", folded, dtype="float64")
    adapted = compare_captures(t, f, metrics=["hidden_state_cosine"],
                               transports=[("pca_adapter", str(tmp_path / "rot" / "global.qa_adapter.safetensors"))])
    for layer in LAYERS:
        want = ledger[layer]["cosine_global"]
        assert values(unfolded, "hidden_state_cosine", layer).value == pytest.approx(want, rel=1e-10)
        assert values(adapted, "hidden_state_cosine", layer).value == pytest.approx(want, rel=1e-9)
