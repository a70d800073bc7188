"""Validation of single transforms: orthogonality, permutations, GQA-respecting head
permutations. Every check names the file/layer, the shape and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.core.errors import BadInputError, NotExactError
from lib.models.adapters.base import ModelAdapter

ORTHO_TOL = 1e-5  # max |QᵀQ − I| entry; a float64 polar factor sits near 1e-14


SAME_ROTATION_TOL = 1e-6  # per-layer Q_l counts as "the global Q" within this max-abs distance


INEXACT_HINT = "pass --allow-inexact to fold it anyway (the equivalence gate then reports the drift instead of passing)"


@dataclass(frozen=True, eq=False)
class HeadPermutation:
    """perm [H] int64 over query heads, kv_perm [G] int64 over kv heads; `exact` False when the
    permutation moves a query head across kv groups (kv_perm is then a best effort)."""

    perm: np.ndarray
    kv_perm: np.ndarray
    exact: bool = True


def _as_layer_index(adapter: ModelAdapter, key: int | str, what: str) -> int:
    if isinstance(key, int | np.integer) and 0 <= int(key) < adapter.num_layers:
        return int(key)
    if isinstance(key, str):
        i = adapter.block_index(key)
        if i is not None:
            return i
    raise BadInputError(
        f"{what}: unknown layer name {key!r}; this {adapter.model_type} checkpoint has blocks "
        f"{adapter.block_name(0)} … {adapter.block_name(adapter.num_layers - 1)}. Fix the layer name in the spec.")


def orthogonality_error(q: np.ndarray) -> float:
    """max |QᵀQ − I| over entries (float64). For q [..., n, n] the max over the batch."""
    q = np.asarray(q, dtype=np.float64)
    eye = np.eye(q.shape[-1])
    return float(np.max(np.abs(np.swapaxes(q, -1, -2) @ q - eye))) if q.size else 0.0


def is_signed_permutation(q: np.ndarray, tol: float = 1e-12) -> bool:
    """True when Q has one ±1 per row and column (then norm gains can be permuted, not folded)."""
    a = np.abs(np.asarray(q, dtype=np.float64))
    ones = np.abs(a - 1.0) <= tol
    zeros = a <= tol
    return bool(np.all(ones | zeros) and np.all(ones.sum(0) == 1) and np.all(ones.sum(1) == 1))


def check_rotation(q: Any, n: int, what: str, batch: int | None = None) -> tuple[np.ndarray, float]:
    """Validate a rotation: shape [n, n] (or [batch, n, n]), finite, orthogonal. Returns (float64, err)."""
    arr = np.asarray(q)
    want = (n, n) if batch is None else (batch, n, n)
    if arr.shape != want:
        raise BadInputError(f"{what}: rotation has shape {list(arr.shape)}, expected {list(want)} "
                            "(from the config); write a matrix for this model's dimensions")
    if not np.issubdtype(arr.dtype, np.floating):
        raise BadInputError(f"{what}: rotation has dtype {arr.dtype}, expected float64")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise BadInputError(f"{what}: rotation holds NaN/inf; re-solve it")
    err = orthogonality_error(arr)
    if err > ORTHO_TOL:
        raise BadInputError(
            f"{what}: not orthogonal: max|QᵀQ − I| = {err:.3g} > {ORTHO_TOL:g}. Only orthogonal matrices fold "
            "exactly; take the polar factor (U Vᵀ of its SVD) and save it in float64.")
    return arr, err


def check_permutation(p: Any, n: int, what: str) -> np.ndarray:
    """Validate a permutation of 0..n-1 (1-D integer). Returns int64."""
    arr = np.asarray(p)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise BadInputError(f"{what}: permutation has shape {list(arr.shape)}, expected [{n}] (from the config)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"{what}: permutation has dtype {arr.dtype}, expected int64")
    arr = arr.astype(np.int64)
    if not np.array_equal(np.sort(arr), np.arange(n)):
        missing = sorted(set(range(n)) - set(arr.tolist()))[:5]
        dup = sorted({int(x) for x in arr if (arr == x).sum() > 1})[:5]
        raise BadInputError(f"{what}: not a permutation of 0..{n - 1} (missing {missing}, repeated {dup}); "
                            "every unit must appear exactly once")
    return arr


def derive_kv_permutation(perm: np.ndarray, num_heads: int, num_kv_heads: int) -> tuple[np.ndarray | None, list[str]]:
    """kv_perm [G] from a query-head permutation, or (None, problems) when a query head moves
    across kv groups. New kv group g holds query heads g*r … g*r+r−1 (r = H/G)."""
    r = num_heads // num_kv_heads
    kv = np.empty(num_kv_heads, dtype=np.int64)
    problems = []
    for g in range(num_kv_heads):
        heads = perm[g * r:(g + 1) * r]
        groups = sorted({int(h) // r for h in heads})
        if len(groups) != 1:
            problems.append(f"new kv group {g} would take old query heads {heads.tolist()} from old kv groups {groups}")
        kv[g] = int(heads[0]) // r
    if problems:
        return None, problems
    return kv, []


def _best_effort_kv_permutation(perm: np.ndarray, num_heads: int, num_kv_heads: int,
                                given: np.ndarray | None) -> np.ndarray:
    """For an inexact (GQA-breaking) head permutation: the given kv_perm if it is one, else the
    majority old group per new group if that is a permutation, else the identity."""
    if given is not None and np.array_equal(np.sort(given), np.arange(num_kv_heads)):
        return given.astype(np.int64)
    r = num_heads // num_kv_heads
    kv = np.array([np.bincount(perm[g * r:(g + 1) * r] // r, minlength=num_kv_heads).argmax()
                   for g in range(num_kv_heads)], dtype=np.int64)
    return kv if np.array_equal(np.sort(kv), np.arange(num_kv_heads)) else np.arange(num_kv_heads, dtype=np.int64)


def check_head_permutation(perm: Any, adapter: ModelAdapter, what: str, allow_inexact: bool,
                           kv_given: Any = None) -> tuple[HeadPermutation, list[str]]:
    """Validate a query-head permutation under GQA; returns it with its kv permutation and any
    inexactness reasons (raises NotExactError for those unless allow_inexact)."""
    H, G = adapter.num_heads, adapter.num_kv_heads
    p = check_permutation(perm, H, what)
    kv_arr = None
    if kv_given is not None:
        kv_arr = np.asarray(kv_given)
        if kv_arr.shape != (G,) or not np.issubdtype(kv_arr.dtype, np.integer):
            raise BadInputError(f"{what}: 'kv_permutation' has shape {list(kv_arr.shape)} / dtype {kv_arr.dtype}, "
                                f"expected int64 [{G}] (num_key_value_heads)")
    kv, problems = derive_kv_permutation(p, H, G)
    if problems:
        msg = (f"{what}: head permutation breaks the GQA groups ({H} query heads share {G} kv heads, "
               f"{H // G} per group): {'; '.join(problems)}. A query head can only move inside its kv group "
               "(or with its whole group).")
        if not allow_inexact:
            raise NotExactError(msg + " Fix the permutation, or " + INEXACT_HINT)
        return HeadPermutation(p, _best_effort_kv_permutation(p, H, G, kv_arr), exact=False), [msg]
    if kv_arr is not None and not np.array_equal(kv_arr.astype(np.int64), kv):
        raise BadInputError(f"{what}: stored 'kv_permutation' {kv_arr.tolist()} disagrees with the one the head "
                            f"permutation implies, {kv.tolist()}; drop it or re-derive it")
    return HeadPermutation(p, kv), []


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
