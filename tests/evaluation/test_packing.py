"""Batch cut points: contiguous, capped, and the least padded work (checked against every partition)."""

from __future__ import annotations

import itertools
import random

from flipcheck.evaluation.packing import batch_bounds


def _cost(lengths, bounds, forward_cost):
    return sum(max(lengths[a:b]) * (b - a) + forward_cost for a, b in bounds)


def _all_partitions(n, max_rows):
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                bounds.append((start, i))
                start = i
        bounds.append((start, n))
        if all(b - a <= max_rows for a, b in bounds):
            yield bounds


def test_bounds_are_contiguous_capped_and_optimal():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        lengths = sorted((rng.choice([rng.randint(5, 40), rng.randint(100, 700)]) for _ in range(n)), reverse=True)
        max_rows, forward_cost = rng.randint(1, 5), rng.choice([0, 16, 64, 1000])
        bounds = batch_bounds(lengths, max_rows, forward_cost)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b and b - a <= max_rows for a, b in bounds)
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
        best = min(_cost(lengths, p, forward_cost) for p in _all_partitions(n, max_rows))
        assert _cost(lengths, bounds, forward_cost) == best


def test_long_tail_is_cut_where_fixed_batches_pad():
    lengths = [600, 480] + [80] * 30  # two long questions beside many short ones, longest first
    bounds = batch_bounds(lengths, 32, 64)
    padded = sum(max(lengths[a:b]) * (b - a) for a, b in bounds)
    assert padded < 0.5 * 600 * 32  # one batch of 32 pads every short question to 600 tokens
    assert bounds[-1] == (2, 32)  # the short ones share one forward
    # a forward so dear that one batch is cheapest: the fixed cut
    assert batch_bounds(lengths, 32, 10**9) == [(0, 32)]
    assert batch_bounds([], 8, 64) == []
