"""The betting confidence sequence of `eval --until-decided`: its wealth by hand, bounds that bracket
the estimate and agree with the verdict, and the wrong verdict no more often than 1 − confidence
under optional stopping (peeking after every question)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flipcheck.decide import sequential as sq


def test_wealth_is_the_mixture_of_constant_bets_by_hand():
    s, t, m = 3, 10, 0.2
    f_up = 0.9 * np.geomspace(1e-3, 1.0, 2)  # λ m for the two bets of K⁺
    by_hand = np.mean([(1 + f / m * (1 - m)) ** s * (1 - f) ** (t - s) for f in f_up])
    assert float(sq._log_wealth(s, t, m, True, grid=2)) == pytest.approx(math.log(by_hand))
    f_down = 0.9 * np.array([0.5, 1.0])  # λ (1 − m) for the two bets of K⁻
    by_hand = np.mean([(1 + f / (1 - m) * m) ** (t - s) * (1 - f) ** s for f in f_down])
    assert float(sq._log_wealth(s, t, m, False, grid=2)) == pytest.approx(math.log(by_hand))


@pytest.mark.parametrize(("s", "t"), [(0, 50), (1, 100), (5, 100), (40, 400), (30, 30)])
def test_bounds_bracket_the_rate_and_agree_with_the_verdict(s, t):
    lo, hi = sq.lower_bound(s, t, 0.05), sq.upper_bound(s, t, 0.05)
    assert 0.0 <= lo <= s / t <= hi <= 1.0
    for budget in (0.01, 0.05, 0.1, 0.2, 0.5):
        v = sq.verdict(s, t, budget, 0.05)
        if hi < budget - 1e-6:
            assert v == "pass"
        elif lo > budget + 1e-6:
            assert v == "fail"
        elif lo + 1e-6 < budget < hi - 1e-6:
            assert v is None
    ns = np.array([t])
    passes, fails = sq.thresholds(ns, 0.05, 0.05)
    assert (s <= passes[0]) == (sq.verdict(s, t, 0.05, 0.05) == "pass")
    assert (s >= fails[0]) == (sq.verdict(s, t, 0.05, 0.05) == "fail")


def test_a_wider_sample_narrows_the_sequence_and_more_confidence_widens_it():
    assert sq.upper_bound(10, 1000, 0.05) < sq.upper_bound(1, 100, 0.05)
    assert sq.upper_bound(10, 1000, 0.01) > sq.upper_bound(10, 1000, 0.05)
    # anytime-valid costs width: wider than the fixed-n Clopper–Pearson bound at the same n
    from flipcheck.evaluation.confidence import cp_upper

    assert sq.upper_bound(10, 1000, 0.05) > cp_upper(10, 1000, 0.95)


@pytest.mark.parametrize("rate", [0.05, 0.04, 0.07])
def test_wrong_verdicts_stay_under_alpha_when_peeking_after_every_question(rate):
    """At the budget itself (FAIL is wrong) and on either side of it, 600 seeded runs of up to 3,000
    questions each, the verdict checked after every question: wrong verdicts <= 5 %."""
    budget, alpha, n = 0.05, 0.05, 3000
    ns = np.arange(1, n + 1)
    passes, fails = sq.thresholds(ns, budget, alpha)
    flips = np.cumsum(np.random.default_rng(int(rate * 1000)).random((600, n)) < rate, axis=1)
    said_pass = (flips <= passes).any(axis=1)
    said_fail = (flips >= fails).any(axis=1)
    first_pass = np.where(said_pass, (flips <= passes).argmax(axis=1), n)
    first_fail = np.where(said_fail, (flips >= fails).argmax(axis=1), n)
    wrong = (first_fail < first_pass) if rate <= budget else (first_pass < first_fail)
    assert wrong.mean() <= alpha
    if rate != budget:  # away from the border most runs decide, and rightly
        assert ((first_pass < n) | (first_fail < n)).mean() > 0.5
