"""Random exact transforms (Haar rotations, GQA-respecting head permutations) for
tests, benchmarks and the demo's planted student.
"""

from __future__ import annotations

import numpy as np


def random_rotation(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal [n, n] float64 matrix (QR of a Gaussian with sign fix)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def random_head_permutation(num_heads: int, num_kv_heads: int, seed: int = 0) -> np.ndarray:
    """A random GQA-respecting query-head permutation [H] int64 (kv groups and heads inside them)."""
    rng = np.random.default_rng(seed)
    r = num_heads // num_kv_heads
    kv = rng.permutation(num_kv_heads)
    return np.concatenate([kv[g] * r + rng.permutation(r) for g in range(num_kv_heads)]).astype(np.int64)
