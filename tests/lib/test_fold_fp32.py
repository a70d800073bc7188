"""A rotation into a bf16/fp16 output runs a float32 GEMM (lib.fold.apply._Fp32Rotation), with the
entries near a rounding boundary redone in float64. Oracle: the float64 product, cast once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lib.fold.apply as apply
from lib.fold.apply import apply_tensor_ops
from lib.fold.plan import TensorOps
from lib.testing.random_transforms import random_rotation


def units_apart(a, b):
    """|a - b| in units of the 16-bit float format (ordered bit-pattern distance; ±0 equal)."""
    def ordered(t):
        i = t.view(torch.int16).int()
        return torch.where(i < 0, -32768 - i, i)
    return (ordered(a) - ordered(b)).abs()


def case(dtype, n=512, m=1536, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=g) * 0.02)
    w[:4] *= 50  # outlier rows: the error bound scales per row
    w[4:8, : n // 2] = -w[4:8, n // 2:]  # rows whose products cancel: results near zero
    src = w.to(dtype)
    scale = np.random.default_rng(seed).uniform(0.5, 1.5, n)
    q = random_rotation(n, seed)
    ops = TensorOps(name="w", source="w", scale=scale, rotation=q)
    exact = (src.double() * torch.from_numpy(scale)) @ torch.from_numpy(q)
    return src, ops, exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_gemm_is_within_one_unit_and_nearly_always_identical(dtype):
    src, ops, exact = case(dtype)
    out = apply_tensor_ops(src, ops, chunk_bytes=1 << 20)  # several chunks
    ref = exact.to(dtype)
    apart = units_apart(out, ref)
    same = (apart == 0).double().mean().item()
    print(f"\n{dtype}: {same:.5%} identical to the float64 result's cast, max {apart.max().item()} unit(s)")
    assert apart.max() <= 1 and same >= 0.999
    if dtype == torch.float16:
        assert same == 1.0  # float16 repairs every entry near a midpoint


def test_negative_control_plain_fp32_misses_near_zero_entries(monkeypatch):
    """Without the repair, the cancelling rows land many units off: the test can tell."""
    src, ops, exact = case(torch.bfloat16)
    monkeypatch.setattr(apply, "_near_boundaries", lambda y, *a, **k: torch.zeros_like(y, dtype=torch.bool))
    plain = apply_tensor_ops(src, ops)
    assert units_apart(plain, exact.to(torch.bfloat16)).max() > 1


def test_fp32_checkpoints_keep_float64_math():
    src, ops, exact = case(torch.float32)
    assert torch.equal(apply_tensor_ops(src, ops), exact.to(torch.float32))
