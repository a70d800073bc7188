"""Procrustes / PCA / pooling from moments vs independent oracles (scipy, float64 numpy SVD)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from lib.core.errors import BadInputError
from lib.transport.procrustes import (
    affine_residual,
    centred_cross,
    complete_rotation,
    mean_cosine_under,
    pca_from_moments,
    polar,
    pooled_cross,
    procrustes_residual,
    solve_pca_procrustes,
    teacher_adapter,
)


def _data(n=400, d=12, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.linspace(0.5, 3.0, d)
    r = ortho_group.rvs(d, random_state=seed)
    return x, x @ r + noise * rng.standard_normal((n, d)), r


def test_polar_of_cross_moment_is_scipy_procrustes():
    x, y, _ = _data()
    r, s = polar(x.T @ y)
    ref, scale = orthogonal_procrustes(x, y)
    assert np.max(np.abs(r - ref)) <= 1e-10
    assert np.isclose(s.sum(), scale)  # scipy's scale is Σσ
    assert np.all(np.diff(s) <= 0)


@pytest.mark.parametrize("reflect", [False, True])
def test_planted_rotation_and_reflection_recovered_exactly(reflect):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 10))
    r = ortho_group.rvs(10, random_state=3)
    if reflect:
        r[:, 0] *= -1
    if np.linalg.det(r) * (-1 if reflect else 1) < 0:
        r[:, 1] *= -1
    got, _ = polar(x.T @ (x @ r))
    assert np.max(np.abs(got - r)) <= 1e-10
    assert np.sign(np.linalg.det(got)) == (-1 if reflect else 1)


def test_residual_and_cosine_formulas_match_direct_computation():
    x, y, _ = _data(seed=2)
    r, _ = polar(x.T @ y)
    direct = np.sum((x @ r - y) ** 2)
    assert np.isclose(procrustes_residual(r, x.T @ y, np.sum(x * x), np.sum(y * y)), direct, rtol=1e-10)
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    yu = y / np.linalg.norm(y, axis=1, keepdims=True)
    cos = np.mean(np.sum((x @ r) * y, 1) / (np.linalg.norm(x @ r, axis=1) * np.linalg.norm(y, axis=1)))
    assert np.isclose(mean_cosine_under(r, xu.T @ yu, len(x)), cos, atol=1e-12)
    # negative control: the identity is a worse map than R
    assert procrustes_residual(np.eye(12), x.T @ y, np.sum(x * x), np.sum(y * y)) > 2 * direct


def test_pooled_rotation_equals_procrustes_on_stacked_layers():
    (x0, y0, _), (x1, y1, _) = _data(seed=4), _data(seed=5)
    q, _ = polar(pooled_cross([x0.T @ y0, x1.T @ y1], [2.0, 1.0]))
    ref, _ = orthogonal_procrustes(np.vstack([np.sqrt(2) * x0, x1]), np.vstack([np.sqrt(2) * y0, y1]))
    assert np.max(np.abs(q - ref)) <= 1e-10


def test_pca_from_moments_equals_svd_of_centred_data():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((500, 9)) @ rng.standard_normal((9, 9)) + rng.standard_normal(9) * 5
    k = 4
    pca = pca_from_moments(x.T @ x, x.sum(0), len(x), k)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = vt[:k].T
    signs = np.sign(np.sum(pca.basis * ref, axis=0))  # SVD's sign is arbitrary
    assert np.max(np.abs(pca.basis - ref * signs)) <= 1e-8
    assert np.allclose(pca.variance, s[:k] ** 2 / len(x), rtol=1e-10)
    assert np.allclose(pca.basis.T @ pca.basis, np.eye(k), atol=1e-12)
    assert np.allclose(pca.mean, x.mean(0))
    with pytest.raises(BadInputError, match="--pca-dim 10"):
        pca_from_moments(x.T @ x, x.sum(0), len(x), 10)


def test_completion_is_orthogonal_and_acts_on_the_subspace_only():
    rng = np.random.default_rng(7)
    b = np.linalg.qr(rng.standard_normal((10, 3)))[0]
    rk = ortho_group.rvs(3, random_state=1)
    rk[:, 0] *= -1  # a reflection in k-space stays a reflection
    q = complete_rotation(b, rk)
    assert np.allclose(q.T @ q, np.eye(10), atol=1e-12)
    assert np.allclose(q @ b, b @ rk, atol=1e-12)  # Q B = B R_k  (q maps row vectors: x @ q)
    v = rng.standard_normal(10)
    v_perp = v - b @ (b.T @ v)
    assert np.allclose(v_perp @ q, v_perp, atol=1e-12)
    assert np.sign(np.linalg.det(q)) == np.sign(np.linalg.det(rk))


def test_pca_procrustes_recovers_a_planted_map_between_widths():
    rng = np.random.default_rng(8)
    n, ds, dt, k = 600, 14, 9, 4
    z = rng.standard_normal((n, k)) * np.array([4.0, 3.0, 2.0, 1.0])
    a_s = np.linalg.qr(rng.standard_normal((ds, k)))[0]
    a_t = np.linalg.qr(rng.standard_normal((dt, k)))[0]
    r_true = ortho_group.rvs(k, random_state=2)
    mx, my = rng.standard_normal(ds) * 3, rng.standard_normal(dt) * 3
    x = z @ a_s.T + mx
    y = z @ r_true @ a_t.T + my
    ps = pca_from_moments(x.T @ x, x.sum(0), n, k)
    pt = pca_from_moments(y.T @ y, y.sum(0), n, k)
    fit = solve_pca_procrustes(ps, pt, centred_cross(x.T @ y, x.sum(0), y.sum(0), n))
    y_hat = (x - mx) @ fit.map + my
    assert np.max(np.abs(y_hat - y)) <= 1e-8
    gxc, gyc = (x - x.mean(0)).T @ (x - x.mean(0)), (y - y.mean(0)).T @ (y - y.mean(0))
    cc = (x - x.mean(0)).T @ (y - y.mean(0))
    assert affine_residual(fit.map, gxc, gyc, cc) <= 1e-8 * np.trace(gyc)
    assert fit.completion.shape == (ds, ds) and np.allclose(fit.completion.T @ fit.completion, np.eye(ds), atol=1e-12)
    # The QA adapter maps the *folded* student (h' = h Q_s) onto the teacher.
    ad = teacher_adapter(fit)
    assert np.max(np.abs((x @ fit.completion - ad["student_mean"]) @ ad["projection"] + ad["teacher_mean"] - y)) <= 1e-8
    # negative control: without the k-space rotation the map is wrong
    wrong = ps.basis @ pt.basis.T
    assert affine_residual(wrong, gxc, gyc, cc) > 0.1 * np.trace(gyc)


def test_polar_refuses_non_finite():
    with pytest.raises(BadInputError, match="NaN"):
        polar(np.array([[1.0, np.nan], [0.0, 1.0]]))
