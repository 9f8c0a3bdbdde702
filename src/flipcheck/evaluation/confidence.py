"""Budgets judged with confidence: one-sided bounds from counts, and how many questions a budget needs.

Pure functions of counts (no models, no reports). A gate judged "with confidence c" asks whether the
*true* rate, not the measured one, is inside the budget, with error probability at most 1 − c:

- flips: the one-sided Clopper–Pearson upper bound (Clopper & Pearson 1934, "The use of confidence or
  fiducial limits illustrated in the case of the binomial", Biometrika 26:404–413). With k flips in
  n questions, U = Beta⁻¹(c; k + 1, n − k) (U = 1 when k = n): the largest p for which
  P(Bin(n, p) ≤ k) ≥ 1 − c. Exact (never below nominal coverage). 0 flips in 400 at 95 %:
  U = 1 − 0.05^(1/400) = 0.746 %; 1 flip in 100: U = 4.66 %.
- Δacc = acc_C − acc_P: the one-sided lower bound of Tango's score interval for the difference of
  two paired proportions (Tango 1998, "Equivalence test and confidence interval for the difference
  in proportions for the paired-sample design", Statistics in Medicine 17:891–908), computed from
  the paired per-question differences d_i = correct_C[i] − correct_P[i] ∈ {−1, 0, +1}. With
  b = #(correct → incorrect), c = #(incorrect → correct), n questions, Δ̂ = (c − b)/n, the score
  statistic for a hypothesised difference δ is

      Z(δ) = √n (Δ̂ − δ) / √(2 x̃ + δ − δ²),

  where x̃ is the maximum-likelihood P(correct → incorrect) under the constraint
  P(i→c) − P(c→i) = δ (a root of 2n x² − B x − b δ (1 − δ) = 0 with B = b(1 − 3δ) + c(1 − δ) − 2sδ,
  s = n − b − c), and 2x̃ + δ − δ² is Var(d_i) under that constraint. The lower bound is the δ < Δ̂
  with Z(δ) = z_c (the c-quantile of the standard normal); Δ̂ = −1 gives −1. Unlike the Wald
  interval Δ̂ − z·sd/√n it does not collapse to a point when no answer changed: with b = c = 0 it is
  −z²/(n + z²) (−0.67 % for n = 400 at 95 %). It is asymptotic (coverage close to, not guaranteed
  above, nominal); the tests check it by exact enumeration of the paired outcomes.
- plan: the smallest number of questions n for which a child that flips the `expected` rate would be
  decided as inside the budget: with k = ⌈expected · n⌉ flips, U(k, n) ≤ budget. By the duality of
  Clopper–Pearson with the binomial test, U(k, n) ≤ budget ⟺ P(Bin(n, budget) ≤ k) ≤ 1 − c. The
  condition is not monotone in n (k steps up with n), so "smallest" means the first n that meets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from flipcheck.errors import FlipcheckError

#: the largest number of questions `plan_questions` searches before it gives up
PLAN_LIMIT = 100_000_000


def check_confidence(confidence: float | str, name: str = "--confidence") -> float:
    """A confidence level strictly between 0.5 and 1 (0.95, or '95%'); anything else is an error."""
    try:
        s = str(confidence).strip()
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        value = math.nan
    if not (0.5 <= value < 1.0) or not math.isfinite(value):
        raise FlipcheckError(f"{name} {confidence!r}: a confidence level in [0.5, 1), e.g. 0.95 or 95%")
    return value


def _counts(k: int, n: int, what: str) -> None:
    if int(n) != n or int(k) != k or n < 1 or k < 0 or k > n:
        raise FlipcheckError(f"{what}: counts must be whole numbers with 0 <= k <= n and n >= 1 (got k={k}, n={n})")


def cp_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound of a proportion with k successes in n trials:
    U = Beta⁻¹(confidence; k + 1, n − k), and 1 when k = n."""
    _counts(k, n, "cp_upper")
    confidence = check_confidence(confidence, "confidence")
    if k == n:
        return 1.0
    return float(stats.beta.ppf(confidence, k + 1, n - k))


def cp_lower(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson lower bound: L = Beta⁻¹(1 − confidence; k, n − k + 1), and 0 when k = 0."""
    _counts(k, n, "cp_lower")
    confidence = check_confidence(confidence, "confidence")
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - confidence, k, n - k + 1))


def _restricted_c2i(b: int, c: int, n: int, delta: float) -> float:
    """Maximum-likelihood P(c→i) of the paired multinomial under P(i→c) − P(c→i) = delta (Tango 1998)."""
    s = n - b - c
    big_b = b * (1 - 3 * delta) + c * (1 - delta) - 2 * s * delta
    disc = big_b * big_b + 8 * n * b * delta * (1 - delta)
    x = (big_b + math.sqrt(max(disc, 0.0))) / (4 * n)
    lo, hi = max(0.0, -delta), (1 - delta) / 2  # both off-diagonal cells and the diagonal non-negative
    return min(max(x, lo), hi)


def tango_score(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic Z(δ) = √n (Δ̂ − δ) / √Var(d | δ) for Δ = P(i→c) − P(c→i)."""
    x = _restricted_c2i(b, c, n, delta)
    var = 2 * x + delta - delta * delta
    diff = (c - b) / n - delta
    if var <= 0:
        return math.inf if diff > 0 else (-math.inf if diff < 0 else 0.0)
    return math.sqrt(n) * diff / math.sqrt(var)


def delta_acc_lower(n_c2i: int, n_i2c: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of Δacc = acc_C − acc_P from the paired counts (Tango's score
    interval, see the module docstring): the δ ≤ Δ̂ with Z(δ) = z_confidence."""
    b, c = int(n_c2i), int(n_i2c)
    _counts(b + c, n, "delta_acc_lower")
    _counts(b, n, "delta_acc_lower")
    confidence = check_confidence(confidence, "confidence")
    est = (c - b) / n
    if est <= -1.0:
        return -1.0
    z = float(stats.norm.ppf(confidence))
    # Z(δ) falls from +inf at δ = -1 to 0 at δ = Δ̂; the bound is where it crosses z
    return float(optimize.brentq(lambda d: tango_score(b, c, n, d) - z, -1.0 + 1e-15, est, xtol=1e-13, rtol=1e-12))


@dataclass(frozen=True)
class Plan:
    """How many questions a flip budget needs to be decided at a confidence."""

    questions: int  # the smallest n that decides the budget (see plan_questions)
    flips: int  # ⌈expected · n⌉: the flips a child at the expected rate shows on those n questions
    bound: float  # the Clopper–Pearson upper bound of those flips: <= budget
    every_from: int  # the smallest n from which every larger n checked also decides it (the sawtooth's end)
    checked_to: int  # the largest n checked for every_from
    budget: float
    expected: float
    confidence: float


def _decided(n: np.ndarray, budget: float, expected: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    k = np.ceil(expected * n - 1e-9).astype(np.int64)  # 1e-9: 0.01 * 300 is 3 flips, not 3.0000000000000004
    return stats.binom.cdf(k, n, budget) <= alpha, k


def plan_questions(budget: float, expected: float, confidence: float = 0.95, *, limit: int = PLAN_LIMIT) -> Plan:
    """The smallest n such that k = ⌈expected · n⌉ flips in n questions have a one-sided
    Clopper–Pearson upper bound <= budget at `confidence`, i.e. P(Bin(n, budget) <= k) <= 1 − confidence.

    A child that truly flips the `expected` rate then passes a `--max-flips budget --confidence c`
    gate on n questions when it shows its expected share of flips. Needs 0 <= expected < budget < 1.
    Because k steps up by one every 1/expected questions, a few n just above the first one fail
    again; `every_from` is the smallest n after which none does, checked up to 2n + 10/expected.
    """
    confidence = check_confidence(confidence, "--confidence")
    if not (0.0 < budget < 1.0):
        raise FlipcheckError(f"--max-flips {budget!r}: a flip rate between 0 and 1 (exclusive), e.g. 2%")
    if not (0.0 <= expected < budget):
        raise FlipcheckError(f"--expected {expected!r}: the flip rate you expect, at least 0 and below --max-flips ({budget!r}); "
                             "at or above the budget no number of questions decides it as passing")
    alpha = 1.0 - confidence
    start, size, first = 1, 4096, None
    while start <= limit and first is None:
        n = np.arange(start, min(start + size, limit + 1), dtype=np.int64)
        ok, k = _decided(n, budget, expected, alpha)
        hit = np.flatnonzero(ok)
        if hit.size:
            first = (int(n[hit[0]]), int(k[hit[0]]))
        start += size
        size = min(size * 2, 1 << 22)
    if first is None:
        raise FlipcheckError(f"plan: more than {limit:,} questions needed for --max-flips {budget:g} with --expected {expected:g}; "
                             "widen the gap between the two")
    n0, k0 = first
    checked_to = 2 * n0 + (int(math.ceil(10 / expected)) if expected > 0 else 0)
    every_from, start = n0, n0
    while start <= checked_to:
        n = np.arange(start, min(start + (1 << 22), checked_to + 1), dtype=np.int64)
        ok, _ = _decided(n, budget, expected, alpha)
        miss = np.flatnonzero(~ok)
        if miss.size:
            every_from = int(n[miss[-1]]) + 1
        start = int(n[-1]) + 1
    return Plan(questions=n0, flips=k0, bound=cp_upper(k0, n0, confidence), every_from=every_from, checked_to=checked_to,
                budget=budget, expected=expected, confidence=confidence)
