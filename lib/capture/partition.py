"""Split a capture plan into partitions: whole batches, balanced by the tokens they compute.

Pure and deterministic (the same plan and N give the same partitions on every host), so a
parent can dispatch partition i by number and the child that runs it re-plans and finds the same
slice. A batch costs its padded size (samples × longest sample): that is what the forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from lib.core.errors import BadInputError


def batch_cost(batch: Sequence[int], n_tokens: Sequence[int]) -> int:
    """Padded tokens of one batch of item positions."""
    return len(batch) * max(n_tokens[i] for i in batch)


def partition_batches(batches: Sequence[Sequence[int]], n_tokens: Sequence[int], n: int) -> list[list[int]]:
    """Assign batch numbers to `n` partitions: largest batch first, each to the partition with the
    fewest tokens so far (ties: the lower partition). Returns one sorted list of batch numbers per
    partition; with fewer batches than partitions the last ones are empty."""
    if n < 1:
        raise BadInputError(f"partitions: must be >= 1, got {n}")
    costs = [batch_cost(b, n_tokens) for b in batches]
    load = [0] * n
    parts: list[list[int]] = [[] for _ in range(n)]
    for b in sorted(range(len(batches)), key=lambda b: (-costs[b], b)):
        p = min(range(n), key=lambda p: (load[p], p))
        parts[p].append(b)
        load[p] += costs[b]
    return [sorted(p) for p in parts]
