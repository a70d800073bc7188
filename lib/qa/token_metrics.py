"""Per-token metrics in float64, shared by QA and the fold's equivalence gate: KL,
surprisal, cosine, RMS.
"""

from __future__ import annotations

import math
from typing import Any

from lib.core.errors import BadInputError

_KL_CHUNK_ELEMENTS = 1 << 22  # rows x vocab per float64 chunk (32 MiB): bounds memory for 150k vocabularies


def _f64(x: Any):
    import torch

    return torch.as_tensor(x).to(torch.float64)


def compute_token_kl(teacher_logits: Any, variant_logits: Any):
    """KL(p_teacher ‖ p_variant) per position, nats. Inputs [T, V] (any float dtype, torch or numpy);
    returns float64 [T]. Computed in float64 in row chunks of bounded size."""
    import torch

    t_all, v_all = torch.as_tensor(teacher_logits), torch.as_tensor(variant_logits)
    if t_all.shape != v_all.shape or t_all.ndim != 2:
        raise BadInputError(f"logits must both be [T, V] of one shape, got {list(t_all.shape)} and {list(v_all.shape)}")
    rows = max(1, _KL_CHUNK_ELEMENTS // max(t_all.shape[1], 1))
    out = []
    for i in range(0, t_all.shape[0], rows):
        lt = torch.log_softmax(t_all[i:i + rows].to(torch.float64), dim=-1)
        lv = torch.log_softmax(v_all[i:i + rows].to(torch.float64), dim=-1)
        pt = lt.exp()
        # p_t = 0 terms contribute 0 (also where both log-probs are -inf, which would give nan)
        out.append(torch.where(pt > 0, pt * (lt - lv), torch.zeros((), dtype=torch.float64)).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def compute_token_surprisal(logits: Any, input_ids: Any):
    """−log p(ids[t+1] | ids[≤t]) for t = 0..T−2, nats. logits [T, V], input_ids [T] int → float64 [T−1]."""
    import torch

    lg, ids = torch.as_tensor(logits), torch.as_tensor(input_ids).to(torch.long)
    if lg.ndim != 2 or ids.ndim != 1 or lg.shape[0] != ids.shape[0]:
        raise BadInputError(f"surprisal needs logits [T, V] and input_ids [T], got {list(lg.shape)} and {list(ids.shape)}")
    if lg.shape[0] < 2:
        return torch.zeros(0, dtype=torch.float64)
    targets = ids[1:]
    if int(targets.max()) >= lg.shape[1] or int(targets.min()) < 0:
        raise BadInputError(f"a token id is outside the logits' vocabulary of {lg.shape[1]}")
    rows = max(1, _KL_CHUNK_ELEMENTS // max(lg.shape[1], 1))
    out = []
    for i in range(0, lg.shape[0] - 1, rows):
        lp = torch.log_softmax(lg[i:min(i + rows, lg.shape[0] - 1)].to(torch.float64), dim=-1)
        out.append(-lp.gather(1, targets[i:i + lp.shape[0], None]).squeeze(1))
    return torch.cat(out)


def compute_token_cosine(a: Any, b: Any):
    """cos(a_t, b_t) per row, float64 [T]; rows where either norm is 0 count as 0. a, b [T, d]."""
    import torch

    a, b = _f64(a), _f64(b)
    if a.shape != b.shape or a.ndim != 2:
        raise BadInputError(f"cosine needs two [T, d] tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros((), dtype=torch.float64))


def compute_rms(h: Any) -> float:
    """sqrt(mean of h²) over all elements, float64. h [T, d]."""
    h = _f64(h)
    return math.sqrt(float((h * h).sum()) / h.numel()) if h.numel() else float("nan")
