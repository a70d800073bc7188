"""MLP-neuron and GQA attention-head permutations from activation correlations (Hungarian).

Convention (shared with the fold, lib/fold/transform_set.py): a permutation `perm` [n] int64 says
the permuted model's unit j is the source model's unit perm[j] (new = old[perm]). The solver
returns the permutation that maps the STUDENT onto the TEACHER: apply it to the student and
its unit j lines up with the teacher's unit j.

- Neurons: Pearson correlation of the `down_proj` inputs (student unit a vs teacher unit b,
  over paired tokens), one Hungarian assignment (`scipy.optimize.linear_sum_assignment`).
- Heads: the `o_proj` input split into H heads of head_dim; the similarity of student head a
  and teacher head b is the mean over the head's coordinates c of corr(s[a, c], t[b, c])
  (coordinates stay put: a head permutation never mixes them). Under GQA (G kv heads,
  r = H/G query heads each, query head h uses kv head h // r) the matching is two-level:
  an inner r×r assignment for every (teacher group, student group) pair, then an outer G×G
  assignment of groups on the inner optima. So a query head never leaves its kv group and the
  result is valid under GQA by construction; `kv_perm[g]` is the student kv head that becomes
  kv head g.

Both accumulators are streaming (float64, O(units²) memory) and take rows like
`CrossMoments.update`. Run the tests: `.venv/bin/python -m pytest tests/lib/test_permutations.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.core.errors import BadInputError
from lib.transport.stats import accumulate_product


class NeuronCorrelation:
    """Running moments for the Pearson correlation of student units [n_x] vs teacher units [n_y]."""

    def __init__(self, n_x: int, n_y: int) -> None:
        self.n = 0
        self.sum_x, self.sum_y = np.zeros(n_x), np.zeros(n_y)
        self.sq_x, self.sq_y = np.zeros(n_x), np.zeros(n_y)
        self.cross = np.zeros((n_x, n_y))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """x [T, n_x], y [T, n_y] float64 rows paired by index."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        accumulate_product(self.cross, x, y)
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.sq_x += np.einsum("ij,ij->j", x, x)
        self.sq_y += np.einsum("ij,ij->j", y, y)
        self.n += x.shape[0]

    def correlation(self) -> np.ndarray:
        """corr [n_x, n_y] float64; a unit with zero variance correlates 0 with everything."""
        return _pearson(self.cross, self.sum_x, self.sum_y, self.sq_x, self.sq_y, self.n)


class HeadCorrelation:
    """Running per-coordinate moments of per-head outputs: rows [T, H*hd] on both sides."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        self.h, self.hd = int(num_heads), int(head_dim)
        self.n = 0
        self.sum_x, self.sum_y = np.zeros((self.h, self.hd)), np.zeros((self.h, self.hd))
        self.sq_x, self.sq_y = np.zeros((self.h, self.hd)), np.zeros((self.h, self.hd))
        self.cross = np.zeros((self.hd, self.h, self.h))  # [c, a, b] = Σ_t s[t, a, c] y[t, b, c]

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """x, y [T, H*hd] float64 (the o_proj inputs): head h holds columns h*hd … h*hd+hd−1."""
        t = x.shape[0]
        xs = np.asarray(x, np.float64).reshape(t, self.h, self.hd)
        ys = np.asarray(y, np.float64).reshape(t, self.h, self.hd)
        # One batched GEMM per coordinate c: [H, T] @ [T, H].
        self.cross += np.matmul(xs.transpose(2, 1, 0), ys.transpose(2, 0, 1))
        self.sum_x += xs.sum(0)
        self.sum_y += ys.sum(0)
        self.sq_x += np.einsum("tac,tac->ac", xs, xs)
        self.sq_y += np.einsum("tac,tac->ac", ys, ys)
        self.n += t

    def similarity(self) -> np.ndarray:
        """sim [H, H] float64: mean over coordinates of the Pearson correlation of student head a
        and teacher head b at the same coordinate."""
        per_c = np.stack([_pearson(self.cross[c], self.sum_x[:, c], self.sum_y[:, c], self.sq_x[:, c],
                                   self.sq_y[:, c], self.n) for c in range(self.hd)])
        return per_c.mean(axis=0)


def _pearson(cross: np.ndarray, sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, qy: np.ndarray, n: int) -> np.ndarray:
    if n < 2:
        raise BadInputError(f"correlations need at least 2 paired tokens, got {n}")
    cov = cross / n - np.outer(sx / n, sy / n)
    vx = np.maximum(qx / n - (sx / n) ** 2, 0.0)
    vy = np.maximum(qy / n - (sy / n) ** 2, 0.0)
    denom = np.sqrt(np.outer(vx, vy))
    # Relative floor: a unit whose variance is round-off of its mean is constant.
    tiny = 1e-12 * np.sqrt(np.outer(np.maximum(qx / n, 1e-300), np.maximum(qy / n, 1e-300)))
    return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > tiny)


@dataclass(frozen=True)
class NeuronMatch:
    """perm [n] int64 (student → teacher, new = old[perm]); matched [n] = corr(student perm[j],
    teacher j)."""

    perm: np.ndarray
    matched: np.ndarray

    @property
    def mean_matched(self) -> float:
        return float(self.matched.mean()) if self.matched.size else float("nan")


def match_units(sim: np.ndarray) -> NeuronMatch:
    """Hungarian assignment maximising Σ_j sim[perm[j], j] over permutations; sim [n, n] is
    student unit (rows) vs teacher unit (columns)."""
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise BadInputError(f"unit matching needs the same number of units on both sides, got {list(sim.shape)}")
    if not np.all(np.isfinite(sim)):
        raise BadInputError("unit similarities hold NaN/inf (non-finite activations); recapture")
    from scipy.optimize import linear_sum_assignment

    teacher, student = linear_sum_assignment(sim.T, maximize=True)
    perm = np.empty(sim.shape[0], np.int64)
    perm[teacher] = student
    return NeuronMatch(perm, sim[perm, np.arange(sim.shape[0])])


@dataclass(frozen=True)
class HeadMatch:
    """perm [H] int64 over query heads and kv_perm [G] int64 (new kv head g = old kv_perm[g]),
    both student → teacher; matched [H] = sim[perm[j], j]; group_scores [G, G] = the inner
    optimum for (teacher group, student group)."""

    perm: np.ndarray
    kv_perm: np.ndarray
    matched: np.ndarray
    group_scores: np.ndarray

    @property
    def mean_matched(self) -> float:
        return float(self.matched.mean())


def match_heads_gqa(sim: np.ndarray, num_kv_heads: int) -> HeadMatch:
    """Two-level GQA head matching on sim [H, H] (student head rows, teacher head columns)."""
    from scipy.optimize import linear_sum_assignment

    sim = np.asarray(sim, np.float64)
    h = sim.shape[0]
    if sim.shape != (h, h) or num_kv_heads < 1 or h % num_kv_heads:
        raise BadInputError(f"head similarity {list(sim.shape)} cannot be split into {num_kv_heads} kv groups")
    if not np.all(np.isfinite(sim)):
        raise BadInputError("head similarities hold NaN/inf (non-finite activations); recapture")
    g, r = num_kv_heads, h // num_kv_heads
    inner = np.zeros((g, g))
    inner_perm = np.zeros((g, g, r), np.int64)  # [teacher group, student group, i] -> student head in group
    for gt in range(g):
        for gs in range(g):
            block = sim[gs * r:(gs + 1) * r, gt * r:(gt + 1) * r]  # student rows, teacher cols
            t_idx, s_idx = linear_sum_assignment(block.T, maximize=True)
            inner_perm[gt, gs, t_idx] = s_idx
            inner[gt, gs] = block[s_idx, t_idx].sum()
    t_groups, s_groups = linear_sum_assignment(inner, maximize=True)
    kv_perm = np.empty(g, np.int64)
    kv_perm[t_groups] = s_groups
    perm = np.concatenate([kv_perm[gt] * r + inner_perm[gt, kv_perm[gt]] for gt in range(g)]).astype(np.int64)
    return HeadMatch(perm, kv_perm, sim[perm, np.arange(h)], inner)


def is_gqa_valid(perm: np.ndarray, num_heads: int, num_kv_heads: int) -> bool:
    """True when every new kv group takes all its query heads from one old kv group, and the
    old groups so taken form a permutation."""
    perm = np.asarray(perm)
    r = num_heads // num_kv_heads
    if sorted(perm.tolist()) != list(range(num_heads)):
        return False
    groups = [{int(p) // r for p in perm[g * r:(g + 1) * r]} for g in range(num_kv_heads)]
    return all(len(s) == 1 for s in groups) and sorted(next(iter(s)) for s in groups) == list(range(num_kv_heads))
