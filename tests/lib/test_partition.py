"""lib.capture.partition: whole batches, every batch exactly once, deterministic, balanced."""

from __future__ import annotations

import random

import pytest

from lib.capture.partition import batch_cost, partition_batches
from lib.core.errors import BadInputError


def _plan(seed: int, n_items: int = 37, batch_size: int = 4):
    rng = random.Random(seed)
    n_tokens = [rng.randint(3, 64) for _ in range(n_items)]
    order = sorted(range(n_items), key=lambda i: (-n_tokens[i], i))  # as batches_by_length lays them out
    return [order[i:i + batch_size] for i in range(0, n_items, batch_size)], n_tokens


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_every_batch_once_deterministic_and_balanced(n):
    batches, n_tokens = _plan(n)
    parts = partition_batches(batches, n_tokens, n)
    assert len(parts) == n
    assert sorted(b for p in parts for b in p) == list(range(len(batches)))  # each batch exactly once
    assert parts == partition_batches(batches, n_tokens, n)  # same input, same answer
    loads = [sum(batch_cost(batches[b], n_tokens) for b in p) for p in parts]
    # Greedy largest-first is within one batch of perfect balance.
    assert max(loads) - min(loads) <= max(batch_cost(b, n_tokens) for b in batches)
    if n == 1:
        assert parts == [list(range(len(batches)))]


def test_batch_cost_is_padded_tokens_and_an_unbalanced_split_is_caught():
    assert batch_cost([0, 1, 2], [5, 9, 1]) == 27
    batches, n_tokens = _plan(7)
    naive = [list(range(0, len(batches), 2)), list(range(1, len(batches), 2))]  # negative control
    good = partition_batches(batches, n_tokens, 2)
    spread = lambda parts: abs(sum(batch_cost(batches[b], n_tokens) for b in parts[0]) - sum(batch_cost(batches[b], n_tokens) for b in parts[1]))  # noqa: E731
    assert spread(good) <= spread(naive)


def test_more_partitions_than_batches_leaves_empty_ones_and_zero_is_refused():
    parts = partition_batches([[0], [1]], [4, 4], 4)
    assert sorted(map(len, parts)) == [0, 0, 1, 1]
    with pytest.raises(BadInputError, match="partitions: must be >= 1"):
        partition_batches([[0]], [1], 0)
