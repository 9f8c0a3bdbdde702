"""`flipcheck gate`: budgets parsed, verdicts at, below and above every budget."""

from __future__ import annotations

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.report import child_entry, new_report, write_report
from flipcheck.gate import check, parse_budget, run_gate


def _summary(flips=1 / 50, kl=0.01, acc_p=0.5, acc_c=0.49, kl_vocab=None):
    """A task summary with the figures the gate reads (values computed as the metrics compute them)."""
    return {
        "n": 100,
        "flips": flips,
        "acc_P": acc_p,
        "acc_C": acc_c,
        "delta_acc": acc_c - acc_p,  # 0.49 - 0.5 = -0.010000000000000009: float rounding at the budget
        "kl_options": None if kl is None else {"mean": kl},
        "kl_vocab": None if kl_vocab is None else {"mean": kl_vocab},
    }


def _report(*children):
    return new_report({"source": "parent", "fingerprint": "fp"}, {"tasks": ["t"]}, list(children))


BUDGETS = {"max_flips": "2%", "max_kl": "0.01", "min_acc_delta": "-1%", "min_acc": "49%"}


@pytest.mark.parametrize(
    "text, value",
    [("2%", 0.02), ("0.02", 0.02), ("-1%", -0.01), (" 2.5% ", 0.025), ("+1%", 0.01), ("1e-3", 0.001),
     (".5%", 0.005), ("0", 0.0), (0.03, 0.03)],
)
def test_parse_budget_accepted_forms(text, value):
    assert parse_budget(text, "--max-flips") == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize("text", ["abc", "2 %", "%", "", "2%%", "nan", "inf", "1/2", "2pct", float("nan")])
def test_parse_budget_refuses_other_text(text):
    with pytest.raises(FlipcheckError, match=r"--max-flips .*(fraction \(0\.02\) or a percentage \(2%\)|finite)"):
        parse_budget(text, "--max-flips")


def test_exactly_at_every_budget_passes():
    (v,) = check(_report(child_entry("c", {"t": _summary()})), **BUDGETS)
    assert v.passed and v.failures == []
    assert v.text == "PASS t [acc]: flips 2.0% <= 2.0%, KL 0.01 <= 0.01, Δacc -1.0% >= -1.0%, acc 49.0% >= 49.0%"


def test_below_every_budget_passes():
    (v,) = check(_report(child_entry("c", {"t": _summary(flips=0.012, kl=0.004, acc_c=0.52)})), **BUDGETS)
    assert v.passed
    assert v.text == "PASS t [acc]: flips 1.2% <= 2.0%, KL 0.004 <= 0.01, Δacc +2.0% >= -1.0%, acc 52.0% >= 49.0%"


@pytest.mark.parametrize(
    "summary, failure, fragment",
    [
        (_summary(flips=0.021), "flips", "flips 2.1% > 2.0%"),
        (_summary(kl=0.0101), "kl", "KL 0.0101 > 0.01"),
        (_summary(acc_c=0.489), "acc_delta", "Δacc -1.1% < -1.0%"),
        (_summary(acc_p=0.47, acc_c=0.48), "acc", "acc 48.0% < 49.0%"),
    ],
)
def test_above_each_budget_fails_only_that_check(summary, failure, fragment):
    (v,) = check(_report(child_entry("c", {"t": summary})), **BUDGETS)
    assert not v.passed
    assert v.text.startswith("FAIL t [acc]: ") and fragment in v.text
    assert v.failures == [failure] or (failure == "acc_delta" and v.failures == ["acc_delta", "acc"])


def test_only_the_given_budgets_are_checked():
    (v,) = check(_report(child_entry("c", {"t": _summary(flips=0.5, kl=3.0)})), max_kl=5)
    assert v.passed and v.text == "PASS t [acc]: KL 3 <= 5"


def test_one_verdict_per_child_and_task_plus_micro():
    c1 = child_entry("gptq", {"t1": _summary(), "t2": _summary(flips=0.05)}, micro=_summary(flips=0.035))
    c2 = child_entry("awq", {"t1": _summary(flips=0.0)})
    verdicts = check(_report(c1, c2), max_flips="2%")
    assert [(v.child, v.task, v.passed) for v in verdicts] == [
        ("gptq", "t1", True), ("gptq", "t2", False), ("gptq", "all tasks (micro)", False), ("awq", "t1", True),
    ]
    assert verdicts[1].text == "FAIL gptq / t2 [acc]: flips 5.0% > 2.0%"


def test_kl_falls_back_to_vocabulary_kl_and_reports_missing_kl():
    tasks = {"gen": _summary(kl=None, kl_vocab=0.002), "none": _summary(kl=None)}
    v_gen, v_none, _micro = check(_report(child_entry("c", tasks, micro=_summary())), max_kl="0.01")
    assert v_gen.text == "PASS gen [acc]: KL vocab 0.002 <= 0.01"
    assert v_none.passed and v_none.text == "PASS none [acc]: KL n/a"


def test_bad_gate_settings_are_refused():
    rep = _report(child_entry("c", {"t": _summary()}))
    with pytest.raises(FlipcheckError, match="at least one budget"):
        check(rep)
    with pytest.raises(FlipcheckError, match="--max-kl"):
        check(rep, max_kl="-1%")
    with pytest.raises(FlipcheckError, match="--min-acc-delta"):
        check(rep, min_acc_delta="minus one")
    with pytest.raises(FlipcheckError, match="no children"):
        check(_report(), max_flips="2%")


def test_run_gate_reads_a_report_folder(tmp_path):
    rep = _report(child_entry("c", {"t1": _summary(), "t2": _summary(flips=0.03)}, micro=_summary(flips=0.025)))
    write_report(tmp_path, rep, [])
    lines: list[str] = []
    assert run_gate(tmp_path, max_flips="2%", echo=lines.append) is False
    assert lines == [
        "PASS t1 [acc]: flips 2.0% <= 2.0%",
        "FAIL t2 [acc]: flips 3.0% > 2.0%",
        "FAIL all tasks (micro) [acc]: flips 2.5% > 2.0%",
    ]
    assert run_gate(tmp_path / "report.json", max_flips="3%") is True
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(FlipcheckError, match="is not a flipcheck report"):
        run_gate(tmp_path / "x.json", max_flips="2%")


def _mc_sample(doc_id: int, lls: list[float], gold: int, choices: list[str]) -> dict:
    """An lm-eval multiple-choice sample with its acc and acc_norm (lengths from the option texts)."""
    norm = [x / len(c) for x, c in zip(lls, choices, strict=True)]
    return {"doc_id": doc_id, "target": gold, "arguments": [(f"Q{doc_id}:", f" {c}") for c in choices],
            "filtered_resps": [(x, False) for x in lls], "metrics": ["acc", "acc_norm"],
            "acc": float(max(range(len(lls)), key=lls.__getitem__) == gold),
            "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == gold)}


def _norm_report():
    """20 questions: acc never changes between parent and child, acc_norm flips on 4 of them.

    Options "a" (the gold) and "bbbbbbbbbb": the raw log-likelihood prefers "a" (-3 > -10), the
    length-normalised score "bbbbbbbbbb" (-3 < -10/10), except where the child puts -40 on it.
    """
    from flipcheck.evaluation.samples import build_rows, set_headline, summarize_task

    choices = ["a", "bbbbbbbbbb"]
    parent = [_mc_sample(i, [-3.0, -10.0], 0, choices) for i in range(20)]
    child = [_mc_sample(i, [-3.0, -10.0] if i >= 4 else [-3.0, -40.0], 0, choices) for i in range(20)]
    rows = build_rows("hs", parent, child)
    assert set_headline(rows) == "acc_norm"
    return _report(child_entry("c", {"hs": summarize_task(rows, n_boot=100)})), rows


def test_acc_norm_is_the_headline_and_metric_acc_judges_acc():
    report, rows = _norm_report()
    s = report["children"][0]["tasks"]["hs"]
    assert s["metric"] == "acc_norm" and s["flips"] == pytest.approx(4 / 20)
    assert s["by_metric"]["acc"]["flips"] == 0.0 and s["by_metric"]["acc"]["acc_P"] == 1.0
    assert s["by_metric"]["acc_norm"]["acc_P"] == 0.0 and s["by_metric"]["acc_norm"]["n_i2c"] == 4
    assert s["by_metric"]["acc_norm"]["mcnemar_p"] == pytest.approx(2 / 16)
    assert s["delta_acc_ci"] == s["by_metric"]["acc_norm"]["delta_acc_ci"]
    assert sum(r.flipped for r in rows) == 4  # a row's flip follows its headline metric
    from flipcheck.evaluation.report import report_markdown

    md = report_markdown(report, [{"child": "c", **r.to_dict()} for r in rows])
    assert "## Flipped questions (4)" in md and "| ✗ 1: bbbbbbbbbb | ✓ 0: a | i→c |" in md  # the acc_norm answers
    assert "| c | hs (acc_norm) | 20 |" in md and "| c | hs (acc) | 20 |" in md  # both metrics shown
    (default,) = check(report, max_flips="2%")
    (on_acc,) = check(report, max_flips="2%", metric="acc")
    (on_norm,) = check(report, max_flips="2%", metric="acc_norm")
    assert not default.passed and default.text == "FAIL hs [acc_norm]: flips 20.0% > 2.0%"
    assert on_acc.passed and on_acc.text == "PASS hs [acc]: flips 0.0% <= 2.0%"
    assert not on_norm.passed and on_norm.metric == "acc_norm"


def test_bad_metric_is_one_line_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app

    report, rows = _norm_report()
    with pytest.raises(FlipcheckError, match="--metric 'accnorm': choose one of acc, acc_norm"):
        check(report, max_flips="2%", metric="accnorm")
    write_report(tmp_path, report, rows)
    res = CliRunner().invoke(app, ["gate", str(tmp_path), "--max-flips", "2%", "--metric", "accnorm"])
    assert res.exit_code == 2 and "choose one of acc, acc_norm" in res.output
    res = CliRunner().invoke(app, ["gate", str(tmp_path), "--max-flips", "2%", "--metric", "acc"])
    assert res.exit_code == 0 and "PASS hs [acc]" in res.output


# --- with confidence (issue 16) -------------------------------------------------------------------


def _counted(n: int, c2i: int, i2c: int, acc_p: float = 0.5) -> dict:
    """A task summary from paired counts, as summarize_task writes it."""
    return {"n": n, "n_c2i": c2i, "n_i2c": i2c, "flips": (c2i + i2c) / n, "acc_P": acc_p,
            "acc_C": acc_p + (i2c - c2i) / n, "delta_acc": (i2c - c2i) / n, "kl_options": None, "kl_vocab": None}


def test_confidence_passes_zero_flips_in_400_against_one_percent():
    rep = _report(child_entry("c", {"t": _counted(400, 0, 0)}))
    (v,) = check(rep, max_flips="1%", confidence=0.95)
    assert v.passed and v.text == "PASS t [acc]: flips 0.0% (95% upper 0.746%) <= 1.0%"
    (v,) = check(rep, max_flips="0.7%", confidence=0.95)  # the bound, not the point 0 %, is judged
    assert not v.passed


def test_confidence_fails_one_flip_in_100_that_the_point_estimate_passes():
    rep = _report(child_entry("c", {"t": _counted(100, 1, 0)}))
    (point,) = check(rep, max_flips="2%")
    (bound,) = check(rep, max_flips="2%", confidence=0.95)
    assert point.passed and point.text == "PASS t [acc]: flips 1.0% <= 2.0%"
    assert not bound.passed and bound.failures == ["flips"]
    assert bound.text == "FAIL t [acc]: flips 1.0% (95% upper 4.656%) > 2.0%"


def test_confidence_judges_delta_acc_by_its_lower_bound():
    from flipcheck.evaluation.confidence import delta_acc_lower

    rep = _report(child_entry("c", {"t": _counted(200, 3, 1)}))  # Δacc −1 %
    (point,) = check(rep, min_acc_delta="-2%")
    (bound,) = check(rep, min_acc_delta="-2%", confidence="95%")
    lo = delta_acc_lower(3, 1, 200, 0.95)
    assert -0.04 < lo < -0.02  # the lower bound sits below the budget the point estimate meets
    assert point.passed and not bound.passed and bound.failures == ["acc_delta"]
    assert f"(95% lower {_signed(lo)})" in bound.text
    (wide,) = check(rep, min_acc_delta=lo - 1e-6, confidence=0.95)
    assert wide.passed


def _signed(x: float) -> str:
    from flipcheck.files import signed_pct

    return signed_pct(x, 3, trim=True)


def test_without_confidence_the_verdicts_are_unchanged_and_bad_levels_are_refused(tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app

    rep = _report(child_entry("c", {"t": _counted(100, 1, 0)}))
    write_report(tmp_path, rep, [])
    runner = CliRunner()
    res = runner.invoke(app, ["gate", str(tmp_path), "--max-flips", "2%"])
    assert res.exit_code == 0 and "PASS t [acc]: flips 1.0% <= 2.0%" in res.output
    res = runner.invoke(app, ["gate", str(tmp_path), "--max-flips", "2%", "--confidence", "0.95"])
    assert res.exit_code == 1 and "upper 4.656%" in res.output
    res = runner.invoke(app, ["gate", str(tmp_path), "--max-flips", "2%", "--confidence", "95"])
    assert res.exit_code == 2 and "[0.5, 1)" in res.output and len(res.output.strip().splitlines()) == 1


def test_plan_command_prints_the_planned_questions_and_refuses_bad_input():
    from typer.testing import CliRunner

    from flipcheck.cli import app
    from flipcheck.evaluation.confidence import plan_questions

    runner = CliRunner()
    res = runner.invoke(app, ["plan", "--max-flips", "2%", "--expected", "1%"])
    p = plan_questions(0.02, 0.01, 0.95)
    assert res.exit_code == 0 and res.output.startswith(f"{p.questions} questions: {p.flips} flips")
    assert f"every n >= {p.every_from}" in res.output
    res = runner.invoke(app, ["plan", "--max-flips", "2%", "--expected", "3%"])
    assert res.exit_code == 2 and "below --max-flips" in res.output
    res = runner.invoke(app, ["plan", "--max-flips", "2%", "--expected", "1%", "--confidence", "2"])
    assert res.exit_code == 2 and "[0.5, 1)" in res.output
