"""Streaming moments vs float64 numpy on the concatenated rows; masks; chunking; shard streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.core.errors import BadInputError
from lib.testing.synthetic import SyntheticSample, write_capture_from_arrays
from lib.transport import stats
from lib.transport.stats import CrossMoments
from lib.transport.stream import RowSpan, stream_pairs


def _rows(n=257, dx=6, dy=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dx)) * 2 + 1, rng.standard_normal((n, dy)) - 0.5


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("unit_rows", [256, 5])  # 5: Ĉ's pending sampled rows are flushed many times
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("widths", [(6, 6), (7, 4)])
def test_moments_equal_direct_float64_whatever_the_chunking(chunk, widths, unit_rows, monkeypatch):
    monkeypatch.setattr(stats, "UNIT_ROWS", unit_rows)
    x, y = _rows(dx=widths[0], dy=widths[1])
    m = CrossMoments(*widths, full=True, cosine_stride=3)
    for i in range(0, len(x), chunk):
        m.update(x[i:i + chunk], y[i:i + chunk])
    assert m.n == len(x)
    np.testing.assert_allclose(m.cross, x.T @ y, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.gram_x, x.T @ x, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.gram_y, y.T @ y, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.sum_x, x.sum(0), rtol=1e-12)
    assert np.isclose(m.sq_x, np.sum(x * x)) and np.isclose(m.sq_y, np.sum(y * y))
    # Ĉ over tokens 0, 3, 6, … of the whole stream, however it was chunked
    np.testing.assert_allclose(m.cross_unit, _unit(x[::3]).T @ _unit(y[::3]), rtol=1e-12, atol=1e-12)
    assert m.n_unit == len(x[::3])
    if widths[0] == widths[1]:
        cos = np.mean(np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
        assert np.isclose(m.cosine_before, cos, atol=1e-12)
    else:
        assert m.cosine_before is None


def test_masked_rows_never_enter_any_statistic():
    x, y = _rows(n=50)
    keep = np.random.default_rng(1).random(50) > 0.3
    xg, yg = x.copy(), y.copy()
    xg[~keep], yg[~keep] = 1e30, np.nan  # padding garbage: any leak shows up
    masked = CrossMoments(6, 6, full=True)
    masked.update(xg, yg, mask=keep)
    clean = CrossMoments(6, 6, full=True)
    clean.update(x[keep], y[keep])
    assert masked.n == keep.sum()
    for name in ("cross", "gram_x", "gram_y", "sum_x", "sum_y", "cross_unit"):
        np.testing.assert_array_equal(getattr(masked, name), getattr(clean, name))
    assert masked.sq_x == clean.sq_x and masked.cos_sum == clean.cos_sum
    with pytest.raises(BadInputError, match="mask"):
        masked.update(x, y, mask=keep[:10])


def test_merge_and_disk_roundtrip(tmp_path):
    x, y = _rows(n=90)
    a = CrossMoments(6, 6, full=True, cosine_stride=2)
    b = CrossMoments(6, 6, full=True, cosine_stride=2)
    a.update(x[:40], y[:40])
    b.update(x[40:], y[40:])
    a.merge(b)
    whole = CrossMoments(6, 6, full=True, cosine_stride=2)
    whole.update(x, y)
    for name in ("cross", "gram_x", "cross_unit"):
        np.testing.assert_allclose(getattr(a, name), getattr(whole, name), rtol=1e-12)
    a.save(tmp_path / "m.safetensors")
    back = CrossMoments.load(tmp_path / "m.safetensors")
    assert back.n == 90 and back.n_unit == whole.n_unit
    np.testing.assert_array_equal(back.gram_x, a.gram_x)
    np.testing.assert_array_equal(back.cross, a.cross)
    # Oracle: the reference safetensors reader opens it (a pickle, e.g. torch.save, would not) and
    # finds the same float64 arrays.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as fh:
        assert {"cross", "gram_x", "n"} <= set(fh.keys())
        assert fh.get_tensor("cross").dtype == np.float64
        np.testing.assert_array_equal(fh.get_tensor("cross"), a.cross)
    with pytest.raises(BadInputError):
        a.merge(CrossMoments(6, 5))


def test_zero_rows_count_as_zero_cosine():
    x, y = _rows(n=4)
    x[1] = 0
    m = CrossMoments(6, 6, cosine_stride=1)
    m.update(x, y)
    keep = [0, 2, 3]
    cos = np.sum(x[keep] * y[keep], 1) / (np.linalg.norm(x[keep], axis=1) * np.linalg.norm(y[keep], axis=1))
    assert m.n_zero == 1 and np.isclose(m.cosine_before, cos.sum() / 4)
    assert np.all(np.isfinite(m.cross_unit))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_stream_pairs_reads_exactly_the_spanned_rows(tmp_path, dtype):
    rng = np.random.default_rng(3)
    lens = [5, 1, 17, 9]
    xs = [rng.standard_normal((n, 8)) for n in lens]
    ys = [rng.standard_normal((n, 3)) for n in lens]
    s_idx = write_capture_from_arrays(tmp_path / "s", [SyntheticSample(f"t{i}", np.arange(n), {"h": x})
                                                      for i, (n, x) in enumerate(zip(lens, xs))], dtype=dtype)
    t_idx = write_capture_from_arrays(tmp_path / "t", [SyntheticSample(f"t{i}", np.arange(n), {"h": y})
                                                      for i, (n, y) in enumerate(zip(lens, ys))], dtype=dtype)
    spans = [RowSpan(str(s_idx.parent / f"sample_{i:04d}.safetensors"), str(t_idx.parent / f"sample_{i:04d}.safetensors"),
                     1, n) for i, n in enumerate(lens)]
    got_x, got_y = [], []
    n = stream_pairs(spans, [("act/h", "act/h", 8, 3)], [lambda a, b: (got_x.append(a.copy()), got_y.append(b.copy()))],
                     chunk_rows=4)
    assert n == sum(lens) - len(lens)
    assert all(len(c) <= 4 for c in got_x)
    cast = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    want_x = np.concatenate([torch.as_tensor(x).to(cast).double().numpy()[1:] for x in xs])
    want_y = np.concatenate([torch.as_tensor(y).to(cast).double().numpy()[1:] for y in ys])
    np.testing.assert_array_equal(np.concatenate(got_x), want_x)
    np.testing.assert_array_equal(np.concatenate(got_y), want_y)
    assert np.concatenate(got_x).dtype == np.float64


def test_stream_pairs_read_ahead_surfaces_a_read_error_at_its_span_and_stops(tmp_path):
    """The reader thread runs ahead; a shard that vanished mid-run raises in the caller after the
    spans before it were consumed, and no reader thread is left behind."""
    import threading

    idx = write_capture_from_arrays(tmp_path / "s", [SyntheticSample(f"t{i}", np.arange(6), {"h": np.ones((6, 4)) * i})
                                                    for i in range(6)])
    spans = [RowSpan(str(idx.parent / f"sample_{i:04d}.safetensors"), str(idx.parent / f"sample_{i:04d}.safetensors"),
                     0, 6) for i in range(6)]
    (idx.parent / "sample_0004.safetensors").unlink()
    seen = []
    with pytest.raises(BadInputError, match="sample_0004.safetensors: file not found"):
        stream_pairs(spans, [("act/h", "act/h", 4, 4)], [lambda a, b: seen.extend(a[:, 0].tolist())], chunk_rows=6)
    assert seen == [0.0] * 6 + [1.0] * 6 + [2.0] * 6 + [3.0] * 6  # every span before the bad one, in order
    assert not [t for t in threading.enumerate() if t.name == "transport-read-ahead"]


def test_update_refuses_wrong_widths():
    m = CrossMoments(4, 4)
    with pytest.raises(BadInputError, match=r"\[T, 4\]"):
        m.update(np.zeros((3, 5)), np.zeros((3, 4)))
