"""Orthogonal Procrustes, PCA and the pooled global rotation, from accumulated float64 moments.

Everything here works on sufficient statistics (never on token rows), so memory is O(d²)
whatever the token count. Conventions (shared with the fold, see lib/fold/transform_set.py):
row-vector residuals, the student residual x [1, d_s] maps to x @ R ≈ teacher residual y.

    C = Σ xᵀy = U S Vᵀ  →  R = polar(C) = U Vᵀ   minimises ‖X R − Y‖_F over orthogonal R
                                               (det −1 allowed: reflections are exact too)
    ‖X R − Y‖²_F = tr Sx + tr Sy − 2 tr(Rᵀ C)    (= tr Sx + tr Sy − 2 Σσ at the optimum)

Different widths (d_s ≠ d_t): PCA each side to k from the centred covariances, Procrustes in
k-space on the projected centred cross-covariance, and the foldable *square student-side
completion* Q_s = I + B_s (R_k − I) B_sᵀ (orthogonal [d_s, d_s]: rotates the top-k student
subspace by R_k, leaves its complement alone). Since Q_s B_s = B_s R_k, the teacher estimate of
a folded residual h' = h Q_s is (h' − μ_x Q_s) B_s B_tᵀ + μ_y: `teacher_adapter` below, kept
for QA, never folded.

Run the tests: `.venv/bin/python -m pytest tests/lib/test_procrustes.py -q`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lib.core.errors import BadInputError


def polar(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The orthogonal polar factor of c [m, n] (m ≥ n or m ≤ n) and its singular values.

    Returns (U Vᵀ [m, n] float64, σ [min(m, n)] descending). For square c this is the
    orthogonal matrix closest to c in Frobenius norm; det may be −1 (a reflection).
    """
    c = np.asarray(c, dtype=np.float64)
    if not np.all(np.isfinite(c)):
        raise BadInputError("cross-moment holds NaN/inf (a shard holds non-finite activations); recapture it")
    u, s, vt = np.linalg.svd(c, full_matrices=False)
    return u @ vt, s


def pooled_cross(crosses: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ_l w_l C_l in float64 (all C_l of one shape)."""
    if len(crosses) != len(weights) or not crosses:
        raise BadInputError("pooling needs one weight per layer and at least one layer")
    total = np.zeros_like(np.asarray(crosses[0], dtype=np.float64))
    for c, w in zip(crosses, weights, strict=True):
        total += float(w) * np.asarray(c, dtype=np.float64)
    return total


def procrustes_residual(q: np.ndarray, cross: np.ndarray, sq_x: float, sq_y: float) -> float:
    """‖X Q − Y‖²_F for orthogonal Q from moments: tr Sx + tr Sy − 2 tr(Qᵀ C). Clamped at 0
    (it can dip a rounding error below for exact data)."""
    return max(float(sq_x) + float(sq_y) - 2.0 * float(np.sum(q * cross)), 0.0)


def mean_cosine_under(q: np.ndarray, cross_unit: np.ndarray, n: int) -> float:
    """Mean over tokens of cos(x_t Q, y_t) for an orthogonal Q, exactly, from the unit-row
    cross-moment Ĉ = Σ x̂ᵀŷ (x̂ = x/|x|): |x Q| = |x|, so cos = x̂ Q ŷᵀ and the mean is tr(Qᵀ Ĉ)/n."""
    return float(np.sum(q * cross_unit)) / n if n else float("nan")


@dataclass(frozen=True)
class PCA:
    """Top-k principal axes of one side. basis [d, k] orthonormal columns (descending
    variance, sign fixed so each axis's largest-|.| entry is positive), variance [k] (the
    eigenvalues of the covariance with divisor n), mean [d]."""

    basis: np.ndarray
    variance: np.ndarray
    mean: np.ndarray


def covariance(gram: np.ndarray, total: np.ndarray, n: int) -> np.ndarray:
    """Centred covariance (divisor n) from Σ xᵀx [d, d] and Σ x [d]: G/n − μ μᵀ (float64, symmetric)."""
    if n < 1:
        raise BadInputError("covariance of zero tokens; nothing was paired")
    mu = np.asarray(total, dtype=np.float64) / n
    cov = np.asarray(gram, dtype=np.float64) / n - np.outer(mu, mu)
    return (cov + cov.T) / 2


def fix_signs(basis: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (a deterministic sign)."""
    idx = np.argmax(np.abs(basis), axis=0)
    signs = np.sign(basis[idx, np.arange(basis.shape[1])])
    signs[signs == 0] = 1.0
    return basis * signs


def pca_from_moments(gram: np.ndarray, total: np.ndarray, n: int, k: int) -> PCA:
    """PCA to k axes from accumulated moments (float64 eigh of the covariance).

    Equals the top-k right singular vectors of the centred data matrix (up to the sign fixed
    by `fix_signs`), with variance = σ²/n.
    """
    d = np.asarray(gram).shape[0]
    if not 1 <= k <= d:
        raise BadInputError(f"--pca-dim {k} must be between 1 and the width {d}")
    cov = covariance(gram, total, n)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:k]
    return PCA(fix_signs(evecs[:, order]), np.maximum(evals[order], 0.0), np.asarray(total, np.float64) / n)


def complete_rotation(basis: np.ndarray, r_k: np.ndarray) -> np.ndarray:
    """The square orthogonal completion Q = I + B (R_k − I) Bᵀ [d, d] of a k-space rotation
    R_k [k, k] acting on the span of B [d, k] (orthonormal columns); Q B = B R_k."""
    b = np.asarray(basis, dtype=np.float64)
    d, k = b.shape
    q = np.eye(d) + b @ (np.asarray(r_k, dtype=np.float64) - np.eye(k)) @ b.T
    return q


@dataclass(frozen=True)
class PCAProcrustes:
    """A k-space Procrustes fit between two widths.

    student / teacher: the PCA of each side; r_k [k, k] = polar(B_sᵀ C_c B_t) with C_c the
    centred cross-covariance; singular_values [k]; completion [d_s, d_s] (foldable);
    map [d_s, d_t] = B_s R_k B_tᵀ (the centred student → teacher estimate).
    """

    student: PCA
    teacher: PCA
    r_k: np.ndarray
    singular_values: np.ndarray
    completion: np.ndarray
    map: np.ndarray


def centred_cross(cross: np.ndarray, sum_x: np.ndarray, sum_y: np.ndarray, n: int) -> np.ndarray:
    """Σ (x − μx)ᵀ(y − μy) = C − n μx μyᵀ."""
    return np.asarray(cross, np.float64) - np.outer(sum_x, sum_y) / n


def solve_pca_procrustes(student: PCA, teacher: PCA, cross_centred: np.ndarray) -> PCAProcrustes:
    """Procrustes in k-space between two PCAs (same k) given the centred cross-moment [d_s, d_t]."""
    k = student.basis.shape[1]
    if teacher.basis.shape[1] != k:
        raise BadInputError(f"PCA dims differ: student k={k}, teacher k={teacher.basis.shape[1]}")
    c_k = student.basis.T @ cross_centred @ teacher.basis
    r_k, s = polar(c_k)
    return PCAProcrustes(student, teacher, r_k, s, complete_rotation(student.basis, r_k),
                         student.basis @ r_k @ teacher.basis.T)


def affine_residual(m: np.ndarray, gram_x_c: np.ndarray, gram_y_c: np.ndarray, cross_c: np.ndarray) -> float:
    """‖(X − μx) M − (Y − μy)‖²_F from centred moments: tr(Mᵀ Sxc M) + tr Syc − 2 tr(Mᵀ Cc)."""
    val = float(np.sum((gram_x_c @ m) * m)) + float(np.trace(gram_y_c)) - 2.0 * float(np.sum(m * cross_c))
    return max(val, 0.0)


def teacher_adapter(fit: PCAProcrustes) -> dict[str, np.ndarray]:
    """The QA adapter of a PCA fit, for the *folded* student (residual h' = h Q_s):
    ŷ = (h' − student_mean) @ projection + teacher_mean, with projection = B_s B_tᵀ [d_s, d_t]
    and student_mean = μx Q_s (the student mean in the folded basis)."""
    return {"projection": fit.student.basis @ fit.teacher.basis.T,
            "student_mean": fit.student.mean @ fit.completion,
            "teacher_mean": fit.teacher.mean.copy()}
