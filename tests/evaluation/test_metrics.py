"""Metrics against values counted and computed by hand on small arrays written out below."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import metrics as M

# Ten questions. P right on 0-4 and 9; C loses 1 and 4 (c->i) and gains 6 (i->c).
CORRECT_P = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
CORRECT_C = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
# Answers: changed at the three flips (1, 4, 6) and at question 7 (wrong -> a different wrong answer).
PRED_P = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
PRED_C = [0, 2, 2, 3, 1, 1, 0, 1, 0, 1]


def test_accuracy_flips_and_answer_changes_match_hand_counts():
    assert M.accuracy(CORRECT_P) == pytest.approx(0.6)
    assert M.accuracy(CORRECT_C) == pytest.approx(0.5)
    assert M.delta_accuracy(CORRECT_P, CORRECT_C) == pytest.approx(-0.1)
    assert M.flips(CORRECT_P, CORRECT_C) == pytest.approx(0.3)
    assert M.flip_directions(CORRECT_P, CORRECT_C) == pytest.approx((0.2, 0.1))
    assert M.discordant_counts(CORRECT_P, CORRECT_C) == (2, 1)
    assert M.answer_changes(PRED_P, PRED_C) == pytest.approx(0.4)
    # answer changes count wrong -> different wrong, so they are at least the flips
    assert M.answer_changes(PRED_P, PRED_C) >= M.flips(CORRECT_P, CORRECT_C)


def test_identical_child_has_no_flips():
    assert M.flips(CORRECT_P, CORRECT_P) == 0.0
    assert M.answer_changes(PRED_P, list(PRED_P)) == 0.0
    assert M.mcnemar_p(CORRECT_P, CORRECT_P) == 1.0


def test_mismatched_lengths_are_refused():
    with pytest.raises(FlipcheckError, match="same instances"):
        M.flips(CORRECT_P, CORRECT_C[:9])
    with pytest.raises(FlipcheckError, match="same instances"):
        M.answer_changes(PRED_P, PRED_C[:3])


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),  # no discordant pairs
        (2, 1, 1.0),  # n=3: 2*(C(3,0)+C(3,1))/8 = 2*4/8 = 1
        (8, 1, 20 / 512),  # n=9: 2*(1+9)/512 = 0.0390625
        (1, 8, 20 / 512),  # symmetric
        (10, 0, 2 / 1024),  # n=10: 2*1/1024
        (5, 5, 1.0),  # 2*638/1024 > 1, capped
        (7, 2, 2 * (1 + 9 + 36) / 512),  # n=9: 2*(C(9,0)+C(9,1)+C(9,2))/512 = 92/512
    ],
)
def test_mcnemar_exact_matches_hand_values(b, c, expected):
    assert M.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_agrees_with_scipy_binomtest_when_available():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 11), (40, 25), (120, 90), (0, 6)]:
        assert M.mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_large_counts_stay_finite():
    # 2^10100 does not fit a float; integer arithmetic keeps the ratio exact. Normal approximation:
    # z = (5100 - 5000) / sqrt(10100) = 0.995 -> two-sided p ~ 0.32
    assert M.mcnemar_exact(5000, 5100) == pytest.approx(0.32, abs=0.01)
    assert M.mcnemar_exact(2000, 0) == 0.0  # 2 / 2^2000 underflows to zero, no overflow error


def test_kl_over_options_matches_hand_computation():
    # question 0: P = (1/2, 1/4, 1/4), C = (1/4, 1/2, 1/4): KL = 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2
    # question 1: P = (0.8, 0.2), C = (0.5, 0.5): KL = 0.8 ln 1.6 + 0.2 ln 0.4
    # log-likelihoods are shifted by constants: softmax must not care
    ll_p = [np.log([0.5, 0.25, 0.25]) - 3.0, np.log([0.8, 0.2]) - 10.0]
    ll_c = [np.log([0.25, 0.5, 0.25]) + 1.5, np.log([0.5, 0.5]) - 7.0]
    expected = [0.25 * math.log(2), 0.8 * math.log(1.6) + 0.2 * math.log(0.4)]
    np.testing.assert_allclose(M.kl_options(ll_p, ll_c), expected, rtol=1e-12)
    # the same as a -inf padded 2-D array
    padded_p = np.array([ll_p[0], [*ll_p[1], -np.inf]])
    padded_c = np.array([ll_c[0], [*ll_c[1], -np.inf]])
    np.testing.assert_allclose(M.kl_options(padded_p, padded_c), expected, rtol=1e-12)
    # identical distributions: exactly 0; KL is not symmetric
    np.testing.assert_array_equal(M.kl_options(ll_p, ll_p), [0.0, 0.0])
    rev = M.kl_options(ll_c, ll_p)
    assert rev[1] == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2))


def test_kl_is_infinite_when_child_gives_zero_probability():
    kl = M.kl_options([[0.0, 0.0]], [[0.0, -np.inf]])
    assert kl[0] == np.inf


def test_kl_refuses_different_option_counts():
    with pytest.raises(FlipcheckError, match="question 1"):
        M.kl_options([[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0, 2.0]])


def test_option_probs_softmax_and_padding():
    p = M.option_probs([np.log([0.2, 0.3, 0.5]), np.log([0.9, 0.1])])
    np.testing.assert_allclose(p, [[0.2, 0.3, 0.5], [0.9, 0.1, 0.0]], atol=1e-15)
    # huge log-likelihoods do not overflow
    np.testing.assert_allclose(M.option_probs([[-1000.0, -1000.0 + math.log(3)]]), [[0.25, 0.75]])


def test_top_margin_and_margin_by_correctness():
    m = M.top_margin([np.log([0.5, 0.25, 0.25]), np.log([0.8, 0.2]), [0.0]])
    assert m[0] == pytest.approx(0.25)
    assert m[1] == pytest.approx(0.6)
    assert math.isnan(m[2])  # one option: no runner-up
    # correct questions margins 0.6 and 0.2 (mean 0.4); incorrect 0.1 (NaN skipped)
    mc, mi = M.margin_by_correctness([0.6, 0.1, 0.2, np.nan], [True, False, True, False])
    assert mc == pytest.approx(0.4)
    assert mi == pytest.approx(0.1)


def test_flip_rate_by_decile_distinct_margins():
    margin = np.arange(10) / 10.0  # one question per decile
    flipped = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    dec = M.flip_rate_by_margin_decile(margin, flipped)
    assert [d["n"] for d in dec] == [1] * 10
    assert [d["flip_rate"] for d in dec] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert dec[0]["lo"] == 0.0 and dec[-1]["hi"] == pytest.approx(0.9)


def test_flip_rate_by_decile_keeps_ties_together():
    # six tied margins: quantile edges 1..5 all equal 0.1, so the ties share one bin (bin 5)
    # and bins 0-4 stay empty; edges 6..9 are 0.14, 0.23, 0.32, 0.41 (linear interpolation)
    margin = [0.1] * 6 + [0.2, 0.3, 0.4, 0.5]
    flipped = [1, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    dec = M.flip_rate_by_margin_decile(margin, flipped)
    assert [d["n"] for d in dec] == [0, 0, 0, 0, 0, 6, 1, 1, 1, 1]
    assert [d["flips"] for d in dec] == [0, 0, 0, 0, 0, 2, 1, 0, 0, 0]
    assert dec[0]["flip_rate"] is None
    assert dec[5]["flip_rate"] == pytest.approx(2 / 6)
    assert [round(d["hi"], 10) for d in dec[5:]] == [0.14, 0.23, 0.32, 0.41, 0.5]
    # NaN margins are left out
    assert sum(d["n"] for d in M.flip_rate_by_margin_decile([*margin, np.nan], [*flipped, 1])) == 10


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    ci = M.bootstrap_delta_ci(CORRECT_P, CORRECT_C, n_boot=1000, seed=3)
    assert ci[0] <= M.delta_accuracy(CORRECT_P, CORRECT_C) <= ci[1]
    assert ci == M.bootstrap_delta_ci(CORRECT_P, CORRECT_C, n_boot=1000, seed=3)
    # resampled means of d = C - P take values k/10 only
    assert all(abs(x * 10 - round(x * 10)) < 1e-9 for x in ci)


def test_bootstrap_ci_degenerate_and_width():
    same = np.ones(50, dtype=bool)
    assert M.bootstrap_delta_ci(same, same) == (0.0, 0.0)
    assert M.bootstrap_delta_ci(~same, same) == (1.0, 1.0)  # every question gained
    # 2000 questions, 10% c->i, 5% i->c: sd(d) = sqrt(0.15 - 0.05^2); 95% width ~ 2*1.96*sd/sqrt(n)
    n = 2000
    p = np.ones(n, dtype=bool)
    c = np.ones(n, dtype=bool)
    p[:100] = False
    c[100:300] = False
    lo, hi = M.bootstrap_delta_ci(p, c, n_boot=1000, seed=0)
    expected = 2 * 1.96 * math.sqrt(0.15 - 0.05**2) / math.sqrt(n)
    assert hi - lo == pytest.approx(expected, rel=0.12)
    assert lo < -0.05 < hi
    assert (lo, hi) != M.bootstrap_delta_ci(p, c, n_boot=1000, seed=1)  # the seed matters


def test_bootstrap_ci_blocks_do_not_change_the_result(monkeypatch):
    a = M.bootstrap_delta_ci(CORRECT_P, CORRECT_C, n_boot=300, seed=1)
    monkeypatch.setattr(M, "_BOOT_ELEMENTS", 10)  # one resample row per block
    assert M.bootstrap_delta_ci(CORRECT_P, CORRECT_C, n_boot=300, seed=1) == a


def test_summary_stats_by_hand():
    s = M.summary_stats([1.0, 2.0, 3.0, 4.0, None, np.inf])
    # finite values 1..4: p95 at position 0.95*3 = 2.85 -> 3.85; p99 at 2.97 -> 3.97
    assert s == pytest.approx({"n": 5, "nonfinite": 1, "mean": 2.5, "median": 2.5, "p95": 3.85, "p99": 3.97, "max": 4.0})
    assert M.summary_stats([None, None]) is None


def test_vocab_kl_summary_by_hand():
    s = M.vocab_kl_summary([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 1])
    assert s == pytest.approx({"tokens": 4, "nonfinite": 0, "mean": 0.25, "median": 0.25, "p99": 0.397, "top1_agree": 0.75})
    assert M.vocab_kl_summary([]) is None


def test_pearson_by_hand():
    # x = 1,2,3; y = 2,4,7: sum dx*dy = 5, sxx = 2, syy = 114/9 -> r = 5 / sqrt(228/9)
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(228 / 9))
    assert M.pearson([1, 2, 3], [-1, -2, -3]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) is None
    assert M.pearson([1], [2]) is None
