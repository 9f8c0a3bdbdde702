"""Confidence bounds and the sample-size planner, checked against exact binomial computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.confidence import (
    _restricted_c2i,
    check_confidence,
    cp_lower,
    cp_upper,
    delta_acc_lower,
    plan_questions,
    tango_score,
)


@pytest.mark.parametrize("k, n", [(0, 400), (1, 100), (3, 50), (7, 7), (0, 1), (12, 1000)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_cp_upper_is_where_the_binomial_tail_equals_alpha(k, n, conf):
    u = cp_upper(k, n, conf)
    if k == n:
        assert u == 1.0
        return
    # the defining property: P(X <= k | n, U) = 1 - conf, and any larger p makes k less likely than that
    assert stats.binom.cdf(k, n, u) == pytest.approx(1 - conf, rel=1e-9)
    assert stats.binom.cdf(k, n, u * 1.001) < 1 - conf
    assert k / n <= u


@pytest.mark.parametrize("k, n", [(0, 400), (1, 100), (3, 50), (7, 7), (12, 1000)])
def test_cp_lower_is_where_the_upper_tail_equals_alpha(k, n):
    lo = cp_lower(k, n, 0.95)
    if k == 0:
        assert lo == 0.0
        return
    assert stats.binom.sf(k - 1, n, lo) == pytest.approx(0.05, rel=1e-9)  # P(X >= k | lo) = alpha
    assert lo <= k / n


def test_cp_upper_figures_of_the_issue():
    assert cp_upper(0, 400, 0.95) == pytest.approx(1 - 0.05 ** (1 / 400), rel=1e-12)  # 0.746 %
    assert round(cp_upper(0, 400, 0.95), 5) == 0.00746
    assert round(cp_upper(1, 100, 0.95), 4) == 0.0466


def test_restricted_mle_maximises_the_constrained_likelihood():
    for b, c, n in [(3, 7, 50), (0, 4, 30), (5, 0, 30), (0, 0, 20), (10, 10, 20), (2, 1, 400)]:
        s = n - b - c
        for delta in (-0.3, -0.05, 0.0, 0.02, 0.2):
            lo, hi = max(0.0, -delta), (1 - delta) / 2

            def nll(x, b=b, c=c, s=s, delta=delta):
                terms = [(b, x), (c, x + delta), (s, 1 - 2 * x - delta)]
                return -sum(k * math.log(max(p, 1e-300)) for k, p in terms if k)

            x = _restricted_c2i(b, c, n, delta)
            assert lo - 1e-12 <= x <= hi + 1e-12
            best = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
            assert nll(x) <= best.fun + 1e-7


def test_delta_lower_closed_form_without_discordant_pairs():
    z = stats.norm.ppf(0.95)
    assert delta_acc_lower(0, 0, 400, 0.95) == pytest.approx(-z * z / (400 + z * z), rel=1e-9)


@pytest.mark.parametrize("b, c, n", [(3, 7, 50), (10, 2, 100), (0, 5, 80), (4, 0, 80), (30, 30, 60)])
def test_delta_lower_is_where_the_score_statistic_equals_z(b, c, n):
    lo = delta_acc_lower(b, c, n, 0.95)
    assert lo < (c - b) / n
    assert tango_score(b, c, n, lo) == pytest.approx(stats.norm.ppf(0.95), abs=1e-7)
    assert delta_acc_lower(b, c, n, 0.99) < lo < delta_acc_lower(b, c, n, 0.9)


def test_delta_lower_covers_by_exact_enumeration():
    """Exact coverage over every paired outcome (b, c) of n = 40 questions, at several true rates:
    P(lower bound <= true Δ) is close to 95 % (an asymptotic interval: at least 93 %)."""
    n = 40
    bounds = {(b, c): delta_acc_lower(b, c, n, 0.95) for b in range(n + 1) for c in range(n + 1 - b)}
    for p_c2i, p_i2c in [(0.05, 0.05), (0.1, 0.02), (0.02, 0.1), (0.2, 0.15), (0.01, 0.0)]:
        true = p_i2c - p_c2i
        cover = 0.0
        for (b, c), lo in bounds.items():
            if lo <= true + 1e-12:
                cover += stats.multinomial.pmf([b, c, n - b - c], n, [p_c2i, p_i2c, 1 - p_c2i - p_i2c])
        assert 0.93 <= cover <= 1.0 + 1e-9, (p_c2i, p_i2c, cover)


def _decided(n, budget, expected, alpha):
    return stats.binom.cdf(math.ceil(round(expected * n, 9)), n, budget) <= alpha


@pytest.mark.parametrize("budget, expected, conf", [(0.05, 0.01, 0.95), (0.02, 0.0, 0.95), (0.1, 0.03, 0.9),
                                                    (0.04, 0.02, 0.99), (0.02, 0.01, 0.95)])
def test_plan_is_the_first_n_that_decides_the_budget(budget, expected, conf):
    p = plan_questions(budget, expected, conf)
    alpha = 1 - conf
    assert _decided(p.questions, budget, expected, alpha)
    assert not any(_decided(n, budget, expected, alpha) for n in range(1, p.questions))
    assert p.flips == math.ceil(round(expected * p.questions, 9))
    assert p.bound <= budget and p.bound == pytest.approx(cp_upper(p.flips, p.questions, conf))
    # every_from: the sawtooth's last failure is just before it, and nothing fails after it up to checked_to
    assert p.every_from >= p.questions and p.checked_to >= 2 * p.questions
    assert all(_decided(n, budget, expected, alpha) for n in range(p.every_from, p.checked_to + 1))
    assert p.every_from == p.questions or not _decided(p.every_from - 1, budget, expected, alpha)


def test_plan_zero_expected_matches_the_rule_of_three():
    p = plan_questions(0.01, 0.0, 0.95)
    assert p.questions == math.ceil(math.log(0.05) / math.log(0.99)) == 299 and p.flips == 0 and p.every_from == 299


def test_plan_issue_example_has_a_sawtooth():
    """2 % budget, 1 % expected, 95 %: 590 questions (6 flips) decide it, 601 (7 flips) do not."""
    p = plan_questions(0.02, 0.01, 0.95)
    assert (p.questions, p.flips) == (590, 6)
    assert cp_upper(7, 601, 0.95) > 0.02 and p.every_from > 601


@pytest.mark.parametrize("bad", [0.4, 1.0, "95", "x", 1.5, "nan"])
def test_bad_confidence_names_the_allowed_values(bad):
    with pytest.raises(FlipcheckError, match=r"--confidence .*\[0\.5, 1\)"):
        check_confidence(bad)


def test_bad_plan_inputs_are_refused():
    with pytest.raises(FlipcheckError, match="--expected .*below --max-flips"):
        plan_questions(0.02, 0.02)
    with pytest.raises(FlipcheckError, match="--max-flips"):
        plan_questions(0.0, 0.0)
    with pytest.raises(FlipcheckError, match="counts"):
        cp_upper(5, 4)
    assert check_confidence("95%") == 0.95 and np.isclose(check_confidence("0.9"), 0.9)
