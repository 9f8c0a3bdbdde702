"""Per-layer allocation of compression choices: a multiple-choice knapsack solved exactly by MILP.

Each layer l has options k (a scheme, a sparsity, keep/skip) with a storage size s[l,k] (bits, as
``stats.measure`` counts them) and a damage estimate d[l,k] (e.g. the text KL that layer's choice
causes alone, from ``localize`` or one-layer children). Assuming damage adds up across layers, the
smallest child within a damage budget D is

    minimise   Σ_l Σ_k s[l,k] x[l,k]
    subject to Σ_k x[l,k] = 1               for every layer l   (one option per layer)
               Σ_l Σ_k d[l,k] x[l,k] <= D                        (the damage budget)
               x[l,k] ∈ {0, 1}

(the multiple-choice knapsack problem; Sinha & Zoltners 1979, "The multiple-choice knapsack
problem", Operations Research 27:503–515). The dual question, the least damage within a size budget
S, swaps the objective and the budget row. Both go to ``scipy.optimize.milp`` (HiGHS branch and
bound) with a zero optimality gap, so the answer is exact for the model given; whether damage truly
adds up is for a real evaluation to verify (the search verifies every proposal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, sparse

from flipcheck.errors import FlipcheckError

#: relative slack on the budget row, for float rounding in the solver (an allocation is re-checked exactly)
_SLACK = 1e-9


@dataclass(frozen=True)
class Allocation:
    """One option per layer: its index, and the totals under the additive model."""

    choice: tuple[int, ...]  # choice[l] = the option index chosen for layer l
    size: float  # Σ_l s[l, choice[l]]
    damage: float  # Σ_l d[l, choice[l]]


def _table(values: Sequence[Sequence[float]], what: str) -> list[np.ndarray]:
    rows = [np.asarray(v, dtype=float).ravel() for v in values]
    if not rows:
        raise FlipcheckError(f"allocate: {what}: no layers given")
    for i, r in enumerate(rows):
        if r.size == 0:
            raise FlipcheckError(f"allocate: {what}: layer {i} has no options")
        if not np.all(np.isfinite(r)):
            raise FlipcheckError(f"allocate: {what}: layer {i} has a value that is not finite ({r.tolist()})")
        if np.any(r < 0):
            raise FlipcheckError(f"allocate: {what}: layer {i} has a negative value ({r.tolist()}); sizes and damages are >= 0")
    return rows


def _check(sizes: Sequence[Sequence[float]], damages: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    s, d = _table(sizes, "sizes"), _table(damages, "damages")
    if len(s) != len(d) or any(a.size != b.size for a, b in zip(s, d, strict=False)):
        raise FlipcheckError(f"allocate: sizes and damages must have the same layers and options per layer "
                             f"(got {[a.size for a in s]} and {[b.size for b in d]})")
    return s, d


def _solve(cost: list[np.ndarray], weight: list[np.ndarray], budget: float) -> tuple[int, ...] | None:
    """Minimise Σ cost·x over one option per layer with Σ weight·x <= budget; None when infeasible."""
    counts = [c.size for c in cost]
    n_layers, n_vars = len(cost), sum(counts)
    layer_of = np.repeat(np.arange(n_layers), counts)
    one_each = sparse.csr_array((np.ones(n_vars), (layer_of, np.arange(n_vars))), shape=(n_layers, n_vars))
    w = np.concatenate(weight)
    slack = _SLACK * max(abs(budget), float(np.abs(w).max()), 1.0)
    constraints = [optimize.LinearConstraint(one_each, 1, 1),
                   optimize.LinearConstraint(w[None, :], -np.inf, budget + slack)]
    res = optimize.milp(np.concatenate(cost), integrality=np.ones(n_vars), bounds=optimize.Bounds(0, 1),
                        constraints=constraints, options={"mip_rel_gap": 0.0})
    if res.x is None:
        if res.status == 2:  # infeasible
            return None
        raise FlipcheckError(f"allocate: the MILP solver stopped without an answer: {res.message}")
    x = np.round(res.x).astype(int)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return tuple(int(np.argmax(x[a:a + n])) for a, n in zip(starts, counts, strict=True))


def _allocation(choice: tuple[int, ...], s: list[np.ndarray], d: list[np.ndarray]) -> Allocation:
    return Allocation(choice=choice, size=float(sum(s[i][k] for i, k in enumerate(choice))),
                      damage=float(sum(d[i][k] for i, k in enumerate(choice))))


def smallest_within(sizes: Sequence[Sequence[float]], damages: Sequence[Sequence[float]], max_damage: float) -> Allocation:
    """The allocation of least total size whose additive damage is <= max_damage (exact, by MILP).

    Raises FlipcheckError naming the least damage possible when no allocation meets the budget.
    """
    s, d = _check(sizes, damages)
    return _within(s, d, minimise=s, bound=d, budget=max_damage,
                   what="damage budget", meets="meets", floor="the least damaging option")


def least_damage_within(sizes: Sequence[Sequence[float]], damages: Sequence[Sequence[float]], max_size: float) -> Allocation:
    """The allocation of least total damage whose total size is <= max_size (exact, by MILP): the
    most faithful child of a given size, e.g. the size of a uniform scheme to compare it with."""
    s, d = _check(sizes, damages)
    return _within(s, d, minimise=d, bound=s, budget=max_size,
                   what="size budget", meets="fits", floor="the smallest option")


def _within(s, d, *, minimise, bound, budget: float, what: str, meets: str, floor: str) -> Allocation:
    """Minimise the sum of `minimise` with the sum of `bound` <= `budget`; one-line errors name `what`."""
    if not math.isfinite(budget):
        raise FlipcheckError(f"allocate: the {what} must be a finite number (got {budget!r})")
    least = float(sum(r.min() for r in bound))
    choice = _solve(minimise, bound, budget)
    if choice is None or least > budget * (1 + _SLACK) + _SLACK:
        raise FlipcheckError(f"allocate: no allocation {meets} the {what} {budget:.6g}: {floor} of "
                             f"every layer already sums to {least:.6g}")
    return _allocation(choice, s, d)
