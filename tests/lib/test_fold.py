"""The fold's per-tensor math against a float64 numpy oracle, and the streaming checkpoint I/O
(sharded read/write, index, temp folder + rename, byte-identical side files)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib.core.errors import BadInputError
from lib.fold.checkpoint import fold_checkpoint, fold_state_dict
from lib.fold.checkpoint_io import CheckpointReader, ShardedWriter, TensorEntry, parse_size
from lib.fold.options import FoldOptions
from lib.fold.transform_set import WeightTransformSet
from lib.store.staging import staged_output
from lib.testing.random_transforms import random_head_permutation, random_rotation

H, G, HD, D, INTER = 4, 2, 32, 128, 256


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def all_transforms(cfg: dict, seed: int = 0) -> WeightTransformSet:
    rng = np.random.default_rng(seed)
    return WeightTransformSet.from_arrays(
        cfg, residual_rotation=random_rotation(D, seed + 1),
        head_permutations={0: random_head_permutation(H, G, seed + 2), 1: random_head_permutation(H, G, seed + 3)},
        neuron_permutations={0: rng.permutation(INTER), 1: rng.permutation(INTER)},
        vo_rotations={1: np.stack([random_rotation(HD, seed + 4), random_rotation(HD, seed + 5)])})


def heads(perm: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(p * HD, (p + 1) * HD) for p in perm])


def blockdiag(blocks: list[np.ndarray]) -> np.ndarray:
    n = sum(b.shape[0] for b in blocks)
    out = np.zeros((n, n))
    k = 0
    for b in blocks:
        out[k:k + b.shape[0], k:k + b.shape[0]] = b
        k += b.shape[0]
    return out


def oracle(sd: dict[str, torch.Tensor], ts: WeightTransformSet, tied: bool) -> dict[str, np.ndarray]:
    """The fold rules (lib/fold/checkpoint.py docstring) written out in float64 numpy, one matrix product per rule."""
    w = {k: v.double().numpy() for k, v in sd.items()}
    Q = ts.residual_rotation
    out = {"model.embed_tokens.weight": w["model.embed_tokens.weight"] @ Q, "model.norm.weight": np.ones(D)}
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    out["lm_head.weight"] = head @ np.diag(w["model.norm.weight"]) @ Q
    for i in range(2):
        p = f"model.layers.{i}."
        g_in, g_post = np.diag(w[p + "input_layernorm.weight"]), np.diag(w[p + "post_attention_layernorm.weight"])
        perm = ts.head_permutations[i].perm
        # The oracle's own kv permutation (not the code's): new kv group g is old group perm[g*r] // r.
        r = H // G
        kv = np.array([perm[g * r] // r for g in range(G)])
        assert all(set(perm[g * r:(g + 1) * r] // r) == {kv[g]} for g in range(G)), "test input breaks GQA"
        qi, kvi = heads(perm), heads(kv)
        R = ts.vo_rotations.get(i, np.stack([np.eye(HD)] * G))
        Rv = blockdiag([R[g].T for g in range(G)])  # v rows of kv head g by Rᵀ
        Ro = blockdiag([R[h // (H // G)] for h in range(H)])  # o_proj column block of head h by R
        out[p + "self_attn.q_proj.weight"] = w[p + "self_attn.q_proj.weight"][qi] @ g_in @ Q
        out[p + "self_attn.k_proj.weight"] = w[p + "self_attn.k_proj.weight"][kvi] @ g_in @ Q
        out[p + "self_attn.v_proj.weight"] = Rv @ w[p + "self_attn.v_proj.weight"][kvi] @ g_in @ Q
        out[p + "self_attn.o_proj.weight"] = Q.T @ w[p + "self_attn.o_proj.weight"][:, qi] @ Ro
        if p + "self_attn.q_proj.bias" in w:
            out[p + "self_attn.q_proj.bias"] = w[p + "self_attn.q_proj.bias"][qi]
            out[p + "self_attn.k_proj.bias"] = w[p + "self_attn.k_proj.bias"][kvi]
            out[p + "self_attn.v_proj.bias"] = Rv @ w[p + "self_attn.v_proj.bias"][kvi]
        n = ts.neuron_permutations[i]
        out[p + "mlp.gate_proj.weight"] = w[p + "mlp.gate_proj.weight"][n] @ g_post @ Q
        out[p + "mlp.up_proj.weight"] = w[p + "mlp.up_proj.weight"][n] @ g_post @ Q
        out[p + "mlp.down_proj.weight"] = Q.T @ w[p + "mlp.down_proj.weight"][:, n]
        out[p + "input_layernorm.weight"] = np.ones(D)
        out[p + "post_attention_layernorm.weight"] = np.ones(D)
        for qk in ("q_norm", "k_norm"):
            if f"{p}self_attn.{qk}.weight" in w:
                out[f"{p}self_attn.{qk}.weight"] = w[f"{p}self_attn.{qk}.weight"]  # never touched
    return out


@pytest.mark.parametrize("family,tie", [("qwen2", False), ("qwen3", True)])
def test_every_tensor_matches_the_float64_oracle(make_tiny, tmp_path, family, tie):
    model_dir = make_tiny(family, tie=tie)
    cfg = config_of(model_dir)
    ts = all_transforms(cfg)
    src = load_file(model_dir / "model.safetensors")
    want = oracle(src, ts, tied=tie)
    res = fold_checkpoint(model_dir, tmp_path / "out", ts, FoldOptions(max_shard_bytes=500_000))
    got = load_dir(tmp_path / "out")
    assert set(got) == set(want) and res.untied is tie and len(res.shards) > 1
    for name, w in want.items():
        assert got[name].dtype == torch.float32
        np.testing.assert_allclose(got[name].double().numpy(), w, rtol=1e-6, atol=1e-7, err_msg=name)
    # The in-memory path runs the same code: bitwise equal to what was streamed to disk.
    mem, mem_cfg = fold_state_dict(src, cfg, ts)
    assert mem_cfg["tie_word_embeddings"] is False
    for name, t in got.items():
        assert torch.equal(mem[name], t), name
    # Chunking along the internal axis is invisible in the result.
    small, _ = fold_state_dict(src, cfg, ts, FoldOptions(chunk_bytes=4096))
    for name, t in got.items():
        assert torch.equal(small[name], t), name


def _bf16_units_apart(a, b):
    """|a - b| in bf16 units (the ordered integer distance of the bit patterns; ±0 equal)."""
    def ordered(t):
        i = t.view(torch.int16).int()
        return torch.where(i < 0, -32768 - i, i)
    return (ordered(a) - ordered(b)).abs()


def test_math_is_float64_and_cast_once(make_tiny, tmp_path):
    model_dir = make_tiny("llama")
    cfg = config_of(model_dir)
    q = random_rotation(D, 7)
    ts = WeightTransformSet.from_arrays(cfg, residual_rotation=q)
    src = {k: v.to(torch.bfloat16) for k, v in load_file(model_dir / "model.safetensors").items()}
    out, out_cfg = fold_state_dict(src, cfg, ts)
    name = "model.layers.0.mlp.gate_proj.weight"
    gamma = src["model.layers.0.post_attention_layernorm.weight"].double()
    exact = (src[name].double() * gamma) @ torch.from_numpy(q)
    assert out[name].dtype == torch.bfloat16
    # bf16 output: a float32 GEMM with the entries near a rounding boundary redone in float64 —
    # at most 1 bf16 unit from the float64 result's one cast, and >= 99.9% bitwise equal to it ...
    ref = exact.to(torch.bfloat16)
    assert _bf16_units_apart(out[name], ref).max() <= 1
    assert (out[name] == ref).double().mean() >= 0.999
    # ... float16 output repairs every entry near a midpoint too, float32 output stays float64 math:
    for dt in ("float16", "float32"):
        o, _ = fold_state_dict(src, cfg, ts, FoldOptions(dtype=dt))
        assert torch.equal(o[name], exact.to(o[name].dtype)), dt
    # ... and not what bf16 arithmetic in steps gives (negative control: the test can tell them apart).
    stepwise = ((src[name] * gamma.to(torch.bfloat16)) @ torch.from_numpy(q).to(torch.bfloat16))
    assert (stepwise != out[name]).float().mean() > 0.05
    assert (stepwise.double() - exact).abs().mean() > (out[name].double() - exact).abs().mean()
    # --dtype casts every floating tensor and says so in config.json
    out32, cfg32 = fold_state_dict(src, cfg, ts, FoldOptions(dtype="float32"))
    assert all(t.dtype == torch.float32 for t in out32.values()) and cfg32["dtype"] == "float32"


def test_sharded_source_and_output_round_trip(make_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny("qwen3", tie=True)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(sharded, max_shard_size="300KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((model_dir / f).read_bytes())
    (sharded / "chat_template.jinja").write_bytes("{{ messages }}\n\u00e9".encode())
    reader = CheckpointReader(sharded)
    assert len(reader.weight_files) > 1 and set(reader.entries) == set(load_dir(model_dir))
    ts = WeightTransformSet.from_arrays(config_of(sharded), neuron_permutations={1: np.arange(INTER)[::-1].copy()})
    res = fold_checkpoint(sharded, tmp_path / "out", ts, FoldOptions(max_shard_bytes=200_000))
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) == sorted(res.shards) and len(files) > 2
    sizes = {}
    for f in files:
        with safe_open(str(out / f), framework="pt") as fh:
            assert fh.metadata()["format"] == "pt"
            for k in fh.keys():
                assert index["weight_map"][k] == f
                sizes[k] = fh.get_tensor(k).numel() * 4
        (n,) = struct.unpack("<Q", (out / f).read_bytes()[:8])
        assert n % 8 == 0  # 8-byte aligned data section, as safetensors writes it
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # A permutation only: the tie is kept and no lm_head is written.
    assert "lm_head.weight" not in index["weight_map"] and json.loads((out / "config.json").read_text())[
        "tie_word_embeddings"] is True
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).read_bytes() == (sharded / f).read_bytes(), f
    got, src = load_dir(out), load_dir(model_dir)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"].flip(0))
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"])
    report = json.loads((out / "fold_report.json").read_text())
    assert report["status"] == "unverified" and report["fold"]["n_transformed"] == 3  # gate, up, down of block 1


def test_writer_streams_in_plan_order_and_checks_what_it_gets(tmp_path):
    entries = [TensorEntry("a", "F32", (3, 2)), TensorEntry("b", "BF16", (5,)), TensorEntry("c", "I64", (0,))]
    w = ShardedWriter(tmp_path, entries, max_shard_bytes=24)
    assert [len(s) for s in w.shards] == [1, 2]
    with pytest.raises(RuntimeError, match="expected 'a' next"):
        w.write("b", torch.zeros(5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="planned F32"):
        w.write("a", torch.zeros(3, 2, dtype=torch.float64))
    a = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    w.write("a", a)
    w.write("b", torch.linspace(0, 1, 5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    w.write("c", torch.zeros(0, dtype=torch.int64))
    w.close()
    got = load_dir(tmp_path)
    assert torch.equal(got["a"], a) and got["b"].dtype == torch.bfloat16 and got["c"].shape == (0,)


def test_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with staged_output(out, overwrite=False) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            1 / 0
    assert list(tmp_path.iterdir()) == []
    with staged_output(out, overwrite=False) as tmp:
        (tmp / "new").write_text("1")
    assert (out / "new").read_text() == "1"
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "newer").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["newer"]  # old contents gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folders left


def test_overwrite_and_bad_checkpoints(make_tiny, tmp_path):
    model_dir = make_tiny("llama")
    ts = WeightTransformSet.from_arrays(config_of(model_dir), residual_rotation=random_rotation(D, 1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BadInputError, match="exists and is not empty; pass --overwrite"):
        fold_checkpoint(model_dir, out, ts)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    fold_checkpoint(model_dir, out, ts, FoldOptions(overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()
    # pickle weights are refused, never loaded
    pkl = tmp_path / "pickled"
    pkl.mkdir()
    (pkl / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (pkl / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BadInputError, match="never unpickles"):
        fold_checkpoint(pkl, tmp_path / "o2", ts)
    # a tensor the adapter does not know blocks a rotation (it might hold residual coordinates)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    sd = load_file(model_dir / "model.safetensors")
    save_file({**sd, "model.extra_proj.weight": torch.zeros(D, D)}, str(odd / "model.safetensors"))
    with pytest.raises(BadInputError, match="model.extra_proj.weight.*not known to the llama adapter"):
        fold_checkpoint(odd, tmp_path / "o3", ts)
    # weights that disagree with config.json
    save_file({**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(INTER, D + 1)}, str(odd / "model.safetensors"))
    with pytest.raises(BadInputError, match=r"up_proj.weight' has shape \[256, 129\] but config.json implies \[256, 128\]"):
        fold_checkpoint(odd, tmp_path / "o4", ts)
    assert not any(p.name.startswith(("o2", "o3", "o4", ".tmp")) for p in tmp_path.iterdir())


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30 and parse_size("500MB") == 500_000_000 and parse_size("1024") == 1024
    with pytest.raises(BadInputError, match="not understood"):
        parse_size("lots")


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_unchanged_tensors_are_copied_byte_for_byte(make_tiny, tmp_path, monkeypatch, kernel_copy):
    """Tensors the fold leaves alone go file to file (os.copy_file_range, or pread/write where the
    kernel lacks it) and keep their exact bytes."""
    import os

    if not kernel_copy:
        def refuse(*_a, **_k):
            raise OSError(38, "copy_file_range not supported here")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    model_dir = make_tiny("qwen3")
    ts = WeightTransformSet.from_arrays(config_of(model_dir), neuron_permutations={0: np.arange(INTER)[::-1].copy()})
    fold_checkpoint(model_dir, tmp_path / "out", ts, FoldOptions(max_shard_bytes=300_000))
    got, src = load_dir(tmp_path / "out"), load_dir(model_dir)
    assert set(got) == set(src)
    for name, t in src.items():
        if ".layers.0.mlp." in name:
            assert not torch.equal(got[name], t), name
        else:
            assert torch.equal(got[name], t), name


def test_fold_device_is_checked_before_anything_is_written(make_tiny, tmp_path):
    model_dir = make_tiny("qwen3")
    ts = WeightTransformSet.from_arrays(config_of(model_dir), residual_rotation=random_rotation(D, 1))
    explicit, _ = fold_state_dict(load_file(model_dir / "model.safetensors"), config_of(model_dir), ts,
                                  FoldOptions(device="cpu"))
    default, _ = fold_state_dict(load_file(model_dir / "model.safetensors"), config_of(model_dir), ts)
    assert all(torch.equal(explicit[k], default[k]) for k in default)
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA device is visible"):
            fold_checkpoint(model_dir, tmp_path / "out", ts, FoldOptions(device="cuda"))
        assert not (tmp_path / "out").exists()
