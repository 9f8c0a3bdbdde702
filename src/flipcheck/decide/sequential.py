"""A flip budget decided as soon as the evidence allows: an anytime-valid confidence sequence by betting.

`gate --confidence` judges a fixed number of questions, chosen in advance (`plan`). Scoring questions
in batches and stopping as soon as the verdict is clear needs bounds that hold at every n at once,
not at one n: a *confidence sequence*. This module builds one for the flip rate p from the flip
indicators X_1, X_2, … ∈ {0, 1} of questions taken in a seeded random order (i.i.d. draws from the
population of questions, the model under which the Clopper–Pearson bound of the fixed-n gate holds
too), by betting (Waudby-Smith & Ramdas 2024, "Estimating means of bounded random variables by
betting", JRSS-B 86:1–27).

**Wealth.** To test "p = m" a gambler bets a fraction λ on each question, against the claim:

    K⁺_t(m) = Π_{i≤t} (1 + λ (X_i − m))      (wins when flips are more frequent than m)
    K⁻_t(m) = Π_{i≤t} (1 − λ (X_i − m))      (wins when they are rarer)

If p = m each factor has mean 1, so K_t(m) is a non-negative martingale started at 1, and Ville's
inequality gives P(∃ t: K_t(m) ≥ 1/α) ≤ α: a gambler who ever multiplies the stake by 1/α has
evidence against m that optional stopping cannot fake. If p < m (resp. p > m), K⁺ (resp. K⁻) is a
supermartingale and the same bound holds.

**Bets.** A mixture over G constant bets, K_t(m) = (1/G) Σ_j Π_i (1 ± λ_j(m)(X_i − m)), again a
martingale with mean 1 (a discrete stand-in for the universal portfolio; WSR §5.6, "diversified
Kelly"): it grows nearly as fast as the best constant bet in hindsight, at a cost of log G. The bets
are fractions f_j of the largest one that keeps every factor non-negative, shrunk by c = 0.9:

    K⁺: λ_j(m) = f_j · c / m,   f_j geometric from 10⁻³ to 1;    K⁻: λ_j(m) = f_j · c / (1 − m),   f_j = j / G;

G = 32. (The Kelly bet against m when the rate is p is λ* ≈ (p − m) / (m (1 − m)): for K⁺ that is
f ≈ (p − m)/c, small for a child just over a small budget, hence the geometric grid; for K⁻ it is
f ≈ (m − p)/(m c), a share of 1, hence the even one.) The grids depend on nothing observed, so each
component is a martingale.

With constant bets the wealth depends only on the flips so far S_t and on t:
K⁺_t(m) = (1/G) Σ_j (1 + λ_j (1 − m))^{S_t} (1 − λ_j m)^{t − S_t}. Each factor is monotone in m
(K⁺ falls as m rises, K⁻ rises), so the values of m not rejected form an interval:

    upper bound U_t = the m with K⁻_t(m) = 1/α (every m above it rejected),
    lower bound L_t = the m with K⁺_t(m) = 1/α (every m below it rejected),

each a one-sided confidence sequence at level 1 − α: P(∃ t: p > U_t) ≤ α, P(∃ t: p < L_t) ≤ α.

**Verdict** for a budget B at confidence c (α = 1 − c): PASS once U_t ≤ B (K⁻_t(B) ≥ 1/α), FAIL once
L_t > B (K⁺_t(B) ≥ 1/α), else keep scoring; a run that exhausts the questions undecided is judged
by its last upper bound, as the gate judges (FAIL unless U ≤ B), and says it ran out. A wrong
verdict needs the sequence to miss p on the side that matters (PASS with p > B needs p > U_t at some
t), so it happens with probability at most α whenever the run stops, however many looks it took.
`benchmarks/until_decided_sim.py` checks this over thousands of simulated runs and measures the
questions saved against the fixed n of `plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from flipcheck.errors import FlipcheckError

GRID = 32  # constant bets in the mixture
SHRINK = 0.9  # c: fraction of the largest bet that keeps every factor non-negative
SMALLEST = 1e-3  # the smallest bet, as a fraction of c times the largest


def _log_wealth(s: int | np.ndarray, t: int | np.ndarray, m: float, upward: bool,
                grid: int = GRID, shrink: float = SHRINK) -> np.ndarray:
    """log K⁺_t(m) (upward: evidence that p > m) or log K⁻_t(m), from the flips s among t questions."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    frac = shrink * (np.geomspace(SMALLEST, 1.0, grid) if upward else np.arange(1, grid + 1) / grid)
    if upward:  # factors 1 + λ(1 − m) on a flip, 1 − λ m otherwise; λ m = frac
        if m <= 0:
            return np.where(s > 0, np.inf, 0.0)
        win, lose = np.log1p(frac * (1 - m) / m), np.log1p(-frac)
    else:  # factors 1 + λ m without a flip, 1 − λ(1 − m) on a flip; λ(1 − m) = frac
        if m >= 1:
            return np.where(s < t, np.inf, 0.0)
        win, lose = np.log1p(frac * m / (1 - m)), np.log1p(-frac)
    k_win, k_lose = (s, t - s) if upward else (t - s, s)
    terms = k_win[..., None] * win + k_lose[..., None] * lose
    return logsumexp(terms, axis=-1) - math.log(grid)


def _check(alpha: float) -> float:
    if not (0.0 < alpha < 0.5):
        raise FlipcheckError(f"--confidence {1 - alpha!r}: a confidence level in [0.5, 1), e.g. 0.95")
    return alpha


def upper_bound(s: int, t: int, alpha: float) -> float:
    """U_t: the largest flip rate not rejected by K⁻ at level 1/α (1 when t = 0)."""
    _check(alpha)
    if t == 0:
        return 1.0
    thr, lo, hi = math.log(1 / alpha), s / t, 1.0
    if _log_wealth(s, t, lo, False) >= thr:  # cannot happen (K⁻ at the mean is < 1), kept for safety
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _log_wealth(s, t, mid, False) >= thr else (mid, hi)
    return hi


def lower_bound(s: int, t: int, alpha: float) -> float:
    """L_t: the smallest flip rate not rejected by K⁺ at level 1/α (0 when t = 0)."""
    _check(alpha)
    if t == 0 or s == 0:
        return 0.0
    thr, lo, hi = math.log(1 / alpha), 0.0, s / t
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _log_wealth(s, t, mid, True) >= thr else (lo, mid)
    return lo


def verdict(s: int, t: int, budget: float, alpha: float) -> str | None:
    """'pass' (U_t <= budget), 'fail' (L_t > budget) or None (not yet decided)."""
    thr = math.log(1 / _check(alpha))
    if t == 0:
        return None
    if float(_log_wealth(s, t, budget, False)) >= thr:
        return "pass"
    if float(_log_wealth(s, t, budget, True)) >= thr:
        return "fail"
    return None


def thresholds(ns: np.ndarray, budget: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """For each n in `ns`: the most flips that still PASS at n (−1: none) and the fewest that FAIL
    (n + 1: none). Both wealths are monotone in the flips, so the verdict at (s, n) is s <= pass[n] ->
    PASS, s >= fail[n] -> FAIL. Vectorised for the simulation benchmark."""
    thr = math.log(1 / _check(alpha))
    passes, fails = np.full(len(ns), -1, dtype=np.int64), np.asarray(ns, dtype=np.int64) + 1
    for i, n in enumerate(np.asarray(ns, dtype=np.int64)):
        s = np.arange(n + 1)
        ok = np.flatnonzero(_log_wealth(s, n, budget, False) >= thr)
        bad = np.flatnonzero(_log_wealth(s, n, budget, True) >= thr)
        if ok.size:
            passes[i] = ok[-1]
        if bad.size:
            fails[i] = bad[0]
    return passes, fails


@dataclass
class Sequence:
    """A running flip count for one task, its bounds and verdict."""

    budget: float
    alpha: float
    flips: int = 0
    n: int = 0
    decided: str | None = None

    def add(self, flips: int, n: int) -> str | None:
        self.flips, self.n = self.flips + int(flips), self.n + int(n)
        if self.decided is None:
            self.decided = verdict(self.flips, self.n, self.budget, self.alpha)
        return self.decided

    def bounds(self) -> tuple[float, float]:
        return lower_bound(self.flips, self.n, self.alpha), upper_bound(self.flips, self.n, self.alpha)
