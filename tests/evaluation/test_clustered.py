"""Intervals clustered by subtask: the cluster bootstrap by hand, wider than the plain interval when a
child damages whole subjects, about as wide when flips are spread evenly, and reported beside the
plain ones for a size-weighted group (report.json and the headline sentence)."""

from __future__ import annotations

import numpy as np
import pytest

from flipcheck.evaluation.clustered import cluster_bootstrap_ci, clustered_figures


def test_resampling_clusters_by_hand():
    """Two clusters: every resample is (a, a), (a, b), (b, a) or (b, b); the pooled means are
    S/n of each, so the percentiles lie among those three values."""
    a, b = np.array([1, 1, 1, 0]), np.array([0, 0])
    lo, hi = cluster_bootstrap_ci([a, b], n_boot=2000, seed=0)
    assert (lo, hi) == (pytest.approx(0.0), pytest.approx(0.75))  # (b, b) and (a, a) both occur
    same = [np.array([1, 0, 0, 0])] * 10  # identical clusters: every resample gives the pooled mean
    assert cluster_bootstrap_ci(same, n_boot=200, seed=1) == (pytest.approx(0.25), pytest.approx(0.25))
    assert cluster_bootstrap_ci([a], n_boot=10) is None


def _pairs(flip_of_question) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for k, flips in enumerate(flip_of_question):
        p = rng.random(flips.size) < 0.5
        out[f"subject_{k}"] = (p, np.where(flips, ~p, p))
    return out


def test_damage_to_whole_subjects_widens_the_interval_and_spread_flips_do_not():
    rng = np.random.default_rng(3)
    whole = [np.full(50, k % 5 == 0) for k in range(20)]  # 4 of 20 subjects wrecked, the rest untouched
    spread = [rng.random(50) < 0.2 for _ in range(20)]  # the same 20 % rate, question by question
    w = clustered_figures(_pairs(whole), n_boot=2000, seed=0)
    s = clustered_figures(_pairs(spread), n_boot=2000, seed=0)
    for fig in (w, s):
        assert fig["clusters"] == 20 and fig["flips_ci"][0] <= 0.2 <= fig["flips_ci"][1] + 0.03
    assert w["design_effect_flips"] > 10  # 50 questions of a subject flip together
    assert 0.3 < s["design_effect_flips"] < 3


def test_a_size_weighted_group_reports_clustered_beside_plain():
    from flipcheck.evaluation.report.text import headline
    from flipcheck.evaluation.samples import SampleRow, summarize_group, summarize_task

    def _rows(task, cp, cc):
        return [SampleRow(task=task, doc_id=i, gold=0, pred_P=0 if p else 1, pred_C=0 if c else 1, correct_P=bool(p),
                          correct_C=bool(c), kl_options=0.0, kl_vocab=None, top1_agree=None, margin_P=0.5)
                for i, (p, c) in enumerate(zip(cp, cc, strict=True))]

    leaves = {"s1": _rows("s1", [1] * 8, [0] * 8), "s2": _rows("s2", [1] * 8, [1] * 8), "s3": _rows("s3", [0] * 8, [0] * 8)}
    summaries = {t: summarize_task(r, n_boot=100) for t, r in leaves.items()}
    g = summarize_group("g", leaves, summaries, None, n_boot=500, seed=2)
    cl = g["clustered"]
    assert cl["clusters"] == 3 and g["delta_acc_ci"] is not None  # the plain interval stays
    by_hand = cluster_bootstrap_ci([np.ones(8), np.zeros(8), np.zeros(8)], n_boot=500, seed=2)
    assert tuple(cl["flips_ci"]) == by_hand
    assert "clustered by 3 subtasks" in headline(g)
