"""Judge figures against hand-computed values."""

from __future__ import annotations

import pytest

from flipcheck.judge.stats import (
    cluster_bootstrap_ci,
    correlation,
    judge_delta,
    pair_summary,
    single_summary,
    worst_prompts,
)

RECORDS = [
    {"id": "a", "category": "math", "parent_scores": [8, 6], "child_scores": [6, 6], "pair": "loss", "pair_raw": ["A", "B"]},
    {"id": "b", "category": "math", "parent_scores": [5], "child_scores": [7], "pair": "win", "pair_raw": ["B", "A"]},
    {"id": "c", "category": "writing", "parent_scores": [9], "child_scores": [None], "child_errors": [None],
     "pair": "tie", "pair_raw": ["A", "A"]},
    {"id": "d", "category": None, "parent_scores": [4], "child_scores": [None], "child_errors": ["HTTP 503"],
     "pair": None, "pair_raw": [None, "A"]},
]


def test_single_summary_pairs_turns_and_counts_what_did_not_parse():
    s = single_summary(RECORDS)
    # paired turns: (8,6), (6,6), (5,7) -> parent 19/3, child 19/3
    assert s["n"] == 3 and s["parent_mean"] == pytest.approx(19 / 3) and s["child_mean"] == pytest.approx(19 / 3)
    assert s["delta"] == pytest.approx(0.0)
    assert s["unparsed"] == {"parent": 0, "child": 1} and s["failed"] == {"parent": 0, "child": 1}
    assert s["per_category"]["math"] == {"parent": pytest.approx(19 / 3), "child": pytest.approx(19 / 3),
                                         "delta": pytest.approx(0.0), "n": 3}
    assert s["per_category"]["writing"]["n"] == 0 and s["per_category"]["uncategorised"]["delta"] is None
    assert s["per_turn"]["1"]["delta"] == pytest.approx((-2 + 2) / 2) and s["per_turn"]["2"]["n"] == 1
    lo, hi = s["delta_ci"]
    assert lo <= 0.0 <= hi and lo >= -2.0 and hi <= 2.0


def test_cluster_bootstrap_is_the_ratio_of_resampled_sums():
    assert cluster_bootstrap_ci([], []) is None
    assert cluster_bootstrap_ci([-2.0, -2.0], [1, 1]) == (-2.0, -2.0)  # every resample has the same ratio
    lo, hi = cluster_bootstrap_ci([-4.0, 0.0], [2, 2], n_boot=4000)
    assert lo == pytest.approx(-2.0) and hi == pytest.approx(0.0)


def test_pairs_and_worst():
    p = pair_summary(RECORDS)
    assert (p["win"], p["tie"], p["loss"], p["inconsistent"], p["failed"], p["unparsed"]) == (1, 1, 1, 1, 0, 1)
    assert p["n"] == 3 and p["win_rate"] == pytest.approx(0.5)
    assert [r["id"] for r in worst_prompts(RECORDS)] == ["a"]  # Δ = -1 and a pairwise loss; b won
    assert judge_delta({"single": {"delta": -0.4}}) == -0.4
    assert judge_delta({"pairwise": {"win": 1, "loss": 3, "n": 5}}) == pytest.approx(-0.4)
    assert judge_delta(None) is None


def _child(name, delta, flips, kl):
    return {"name": name, "judge": {"single": {"delta": delta}},
            "micro": None, "tasks": {"t": {"flips": flips, "kl_options": {"mean": kl}}}}


def test_correlation_across_children():
    rep = {"children": [_child("a", 0.0, 0.01, 0.001), _child("b", -0.5, 0.05, 0.01), _child("c", -1.5, 0.2, 0.05)]}
    c = correlation(rep)
    assert c["n_flips"] == 3 and c["r_flips"] < -0.95 and c["r_kl"] < -0.9 and "note" not in c
    alone = {"children": [{"name": "x", "judge": {"single": {"delta": -1.0}}, "tasks": {}, "micro": None}]}
    c = correlation(alone)
    assert c["r_flips"] is None and "no flips or KL" in c["note"]


def test_gate_min_judge_delta():
    from flipcheck.errors import FlipcheckError
    from flipcheck.gate import check

    rep = {"children": [
        {"name": "a", "tasks": {"t": {"flips": 0.01}}, "judge": {"single": {"delta": -0.2}}},
        {"name": "b", "tasks": {"t": {"flips": 0.3}}, "judge": {"single": {"delta": -0.9}}},
        {"name": "c", "tasks": {"t": {"flips": 0.0}}, "judge": {"pairwise": {"win": 0, "loss": 2, "tie": 2, "n": 4}}},
    ]}
    v = check(rep, min_judge_delta="-0.5")
    assert [(x.child, x.passed) for x in v] == [("a", True), ("b", False), ("c", True)]  # c: net win rate -0.5
    assert v[1].text == "FAIL b [judge]: Δscore -0.90 < -0.50" and v[1].failures == ["judge_delta"]
    assert "net win rate -0.50 >= -0.50" in v[2].text
    both = check(rep, max_flips="5%", min_judge_delta=-0.5)
    assert len(both) == 6 and [x.passed for x in both[:3]] == [True, False, True]
    with pytest.raises(FlipcheckError, match="no child in this report was judged"):
        check({"children": [{"name": "x", "tasks": {}}]}, min_judge_delta=0)


def test_report_sections_show_the_worst_prompts_side_by_side():
    from flipcheck.evaluation.report import report_html, report_markdown
    from flipcheck.judge.report import judge_markdown, terminal_lines

    worst = {"id": "m1", "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "parent_answers": ["4", "6"],
             "child_answers": ["5 | five", "<b>7</b>"], "parent_scores": [9, 8], "child_scores": [3, 2], "pair": "loss",
             "delta": -6.0}
    judge = {"judge": {"model": "j", "url": "http://x/v1"}, "grader_version": "v", "mode": "both",
             "prompts": {"n": 1, "source": "demo"}, "max_new_tokens": 8,
             "single": {**single_summary([{"id": "m1", "category": "math", "parent_scores": [9, 8],
                                           "child_scores": [3, 2]}])},
             "pairwise": {"win": 0, "tie": 0, "loss": 1, "inconsistent": 0, "unparsed": 0, "failed": 0, "n": 1,
                          "win_rate": 0.0},
             "worst": [worst]}
    rep = {"schema": "flipcheck.report", "version": 1, "parent": {}, "settings": {},
           "children": [{"name": "kid", "tasks": {}, "micro": None, "judge": judge}]}
    md = "\n".join(judge_markdown(rep))
    assert "| kid | 8.50 | 2.50 | −6.00 |" in md and "prompts the child lost most" in md
    assert "| 1 | What is 2+2? | 4 (9) | 5 \\| five (3) |" in md
    page = report_html(rep, [])
    assert "&lt;b&gt;7&lt;/b&gt;" in page and "<b>7</b>" not in page  # answers are escaped
    assert "## Judged answers" in report_markdown(rep, [])
    assert terminal_lines(rep)[0].startswith("kid: score 8.50 → 2.50 (Δ −6.00")
