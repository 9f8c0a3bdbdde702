"""Generation budgets of the gate: --min-survival T:SHARE and --max-length-ratio, point and with --confidence."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import generations as G
from flipcheck.evaluation.report import child_entry, new_report, write_report
from flipcheck.gate import check
from flipcheck.gate_generations import median_upper, parse_length_ratio, parse_survival


def _gen_summary(first: list[int | None], lengths: list[tuple[int, int]]) -> dict:
    """A generative task summary whose generation block is computed from per-question figures."""
    qs = [G.question_figures(list(range(lp)), list(range(lc)) if d is None else list(range(d)) + [-1] * (lc - d))
          for d, (lp, lc) in zip(first, lengths, strict=True)]
    for q, d in zip(qs, first, strict=True):  # the token lists above only stand for the lengths
        q["first_divergent_token"] = d
    return {"n": len(qs), "metric": "exact_match", "generation": G.task_figures(qs)}


def _report(summary: dict) -> dict:
    return new_report({"source": "parent", "fingerprint": "fp"}, {"tasks": ["t"]}, [child_entry("c", {"t": summary})])


# 10 questions: 9 never diverge, 1 diverges at token 100; lengths: the child is 20% longer on 3 of them
FIRST = [None] * 9 + [100]
LENGTHS = [(200, 200)] * 7 + [(200, 240)] * 3


@pytest.mark.parametrize("text, value", [("128:90%", (128, 0.9)), ("128:0.9", (128, 0.9)), (" 1 : 100% ", (1, 1.0)),
                                         ("64:0", (64, 0.0))])
def test_parse_survival_accepted(text, value):
    t, share = parse_survival(text)
    assert (t, share) == (value[0], pytest.approx(value[1]))


@pytest.mark.parametrize("text", ["128", "90%", "0:90%", "128:190%", "128:1.5", "a:b", "128:-1%", "-5:90%", ""])
def test_parse_survival_refused(text):
    with pytest.raises(FlipcheckError, match=r"--min-survival .*TOKENS:SHARE"):
        parse_survival(text)


@pytest.mark.parametrize("text", ["110%", "0", "-1.1", "x", "inf", "nan"])
def test_parse_length_ratio_refused(text):
    with pytest.raises(FlipcheckError, match=r"--max-length-ratio .*ratio"):
        parse_length_ratio(text)


def test_survival_budget_passes_at_and_fails_above_the_measured_share():
    rep = _report(_gen_summary(FIRST, LENGTHS))
    (v,) = check(rep, min_survival="128:90%")  # S(128) = 9/10 exactly at the budget
    assert v.passed and "S(128) 90% >= 90%" in v.text
    (v,) = check(rep, min_survival="100:100%")  # S(100) = 1: the diverging one is identical through token 100
    assert v.passed
    (v,) = check(rep, min_survival="101:91%")
    assert not v.passed and v.failures == ["survival"] and "S(101) 90% < 91%" in v.text
    (v,) = check(rep, min_survival="5000:90%")  # past every generation: the share of identical generations
    assert v.passed


def test_length_ratio_budget_judges_the_median():
    rep = _report(_gen_summary(FIRST, LENGTHS))
    (v,) = check(rep, max_length_ratio="1.0")  # median of seven 1.0 and three 1.2 is 1.0
    assert v.passed and "length ratio 1 <= 1" in v.text
    longer = _report(_gen_summary(FIRST, [(200, 200)] * 4 + [(200, 240)] * 6))
    (v,) = check(longer, max_length_ratio="1.1")
    assert not v.passed and v.failures == ["length_ratio"] and "length ratio 1.2 > 1.1" in v.text


def test_confidence_judges_the_lower_bound_of_survival_and_the_upper_bound_of_the_median():
    rep = _report(_gen_summary(FIRST, LENGTHS))
    (v,) = check(rep, min_survival="128:50%", confidence="0.95")
    lower = stats.beta.ppf(0.05, 9, 2)  # Clopper-Pearson lower bound of 9 of 10
    assert v.passed == (lower >= 0.5) and f"lower {100 * lower:.3g}%" in v.text
    (v,) = check(rep, min_survival="128:90%", confidence="0.95")
    assert not v.passed  # the point estimate sits at the budget; its lower bound below it
    # the median's upper bound: rank k, smallest with P(Bin(10, .5) <= k - 1) >= 0.95 -> k = 9 -> x_(9) = 1.2
    assert median_upper(sorted([1.0] * 7 + [1.2] * 3), 0.95) == 1.2
    (v,) = check(rep, max_length_ratio="1.1", confidence="0.95")
    assert not v.passed and "length ratio 1 (95% upper 1.2) > 1.1" in v.text
    assert median_upper([1.0, 1.0], 0.95) == math.inf  # two questions cannot bound a median at 95 %


def test_a_task_without_generations_reads_na():
    (v,) = check(_report({"n": 10, "flips": 0.0, "metric": "acc"}), min_survival="128:90%", max_length_ratio="1.1")
    assert v.passed and "S(128) n/a" in v.text and "length ratio n/a" in v.text


def test_cli_and_recipe(tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app
    from flipcheck.recipes.schema import GateSpec

    write_report(tmp_path, _report(_gen_summary(FIRST, LENGTHS)), [])
    runner = CliRunner()
    res = runner.invoke(app, ["gate", str(tmp_path), "--min-survival", "128:90%", "--max-length-ratio", "1.1"])
    assert res.exit_code == 0 and "S(128) 90% >= 90%" in res.output
    res = runner.invoke(app, ["gate", str(tmp_path), "--min-survival", "128:95%"])
    assert res.exit_code == 1
    for bad in (["--min-survival", "128"], ["--max-length-ratio", "10%"]):
        res = runner.invoke(app, ["gate", str(tmp_path), *bad])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    gate = GateSpec(min_survival="128:90%", max_length_ratio=1.1)
    assert gate.budgets()["min_survival"] == "128:90%" and gate.budgets()["max_length_ratio"] == "1.1"
    with pytest.raises(ValueError, match="gate.min_survival"):
        GateSpec(min_survival="lots")
