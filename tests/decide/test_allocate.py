"""The MILP allocation equals brute force on small problems with additive synthetic sensitivities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flipcheck.decide.allocate import least_damage_within, smallest_within
from flipcheck.errors import FlipcheckError


def _problem(seed: int, layers: int):
    """Per layer 2-4 options: more bits, less damage (as W4/W6/W8/keep), with random sensitivities."""
    rng = np.random.default_rng(seed)
    sizes, damages = [], []
    for _ in range(layers):
        k = int(rng.integers(2, 5))
        params = float(rng.integers(1, 20)) * 1e5
        bits = np.sort(rng.choice([2, 3, 4, 6, 8, 16], size=k, replace=False)).astype(float)
        sens = rng.lognormal(0.0, 1.0)  # some layers far more sensitive than others
        sizes.append(params * bits)
        damages.append(sens * 2.0 ** (-bits) + rng.uniform(0, 1e-3, size=k))
    return sizes, damages


def _all(sizes, damages):
    """Every allocation's total size and damage (the brute force)."""
    combos = list(itertools.product(*[range(len(s)) for s in sizes]))
    tot_s = np.array([sum(sizes[i][k] for i, k in enumerate(c)) for c in combos])
    tot_d = np.array([sum(damages[i][k] for i, k in enumerate(c)) for c in combos])
    return combos, tot_s, tot_d


@pytest.mark.parametrize("seed", range(6))
def test_smallest_within_equals_brute_force(seed):
    sizes, damages = _problem(seed, layers=7 + seed % 4)  # 7..10 layers
    combos, tot_s, tot_d = _all(sizes, damages)
    for q in (0.05, 0.3, 0.7):
        budget = float(np.quantile(tot_d, q))
        best = tot_s[tot_d <= budget].min()
        a = smallest_within(sizes, damages, budget)
        assert a.damage <= budget * (1 + 1e-9)
        assert a.size == pytest.approx(best, rel=1e-12)
        assert a.size == pytest.approx(sum(sizes[i][k] for i, k in enumerate(a.choice)), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_least_damage_within_equals_brute_force(seed):
    sizes, damages = _problem(100 + seed, layers=8)
    combos, tot_s, tot_d = _all(sizes, damages)
    for q in (0.1, 0.5, 0.9):
        budget = float(np.quantile(tot_s, q))
        a = least_damage_within(sizes, damages, budget)
        assert a.size <= budget * (1 + 1e-9)
        assert a.damage == pytest.approx(tot_d[tot_s <= budget].min(), rel=1e-9, abs=1e-12)


def test_a_generous_budget_takes_the_smallest_option_everywhere_and_a_tight_one_the_safest():
    sizes, damages = _problem(7, layers=6)
    loose = smallest_within(sizes, damages, 1e9)
    assert loose.choice == tuple(int(np.argmin(s)) for s in sizes)
    tight = smallest_within(sizes, damages, sum(float(np.min(d)) for d in damages))
    assert tight.choice == tuple(int(np.argmin(d)) for d in damages)


def test_infeasible_budgets_fail_with_the_least_possible_figure():
    sizes, damages = _problem(3, layers=5)
    least = sum(float(np.min(d)) for d in damages)
    with pytest.raises(FlipcheckError, match=f"no allocation meets the damage budget .*already sums to {least:.6g}"):
        smallest_within(sizes, damages, least * 0.99)
    with pytest.raises(FlipcheckError, match="no allocation fits the size budget"):
        least_damage_within(sizes, damages, sum(float(np.min(s)) for s in sizes) * 0.5)


@pytest.mark.parametrize("sizes, damages, fragment", [
    ([[1, 2]], [[0.1]], "same layers and options"),
    ([[1, 2], []], [[0.1, 0.2], []], "layer 1 has no options"),
    ([[1, -2]], [[0.1, 0.2]], "negative"),
    ([[1, 2]], [[0.1, float("nan")]], "not finite"),
    ([], [], "no layers"),
])
def test_bad_tables_are_refused(sizes, damages, fragment):
    with pytest.raises(FlipcheckError, match=fragment):
        smallest_within(sizes, damages, 1.0)
