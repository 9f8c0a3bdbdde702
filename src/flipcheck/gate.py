"""The CI gate: fail when a child drifts further from its parent than a budget allows.

    flipcheck gate runs/x/report.json --max-flips 2% --max-kl 0.01 --min-acc-delta -1% --min-acc 60%

One verdict per child and task, plus one over all questions (micro) when a child has several
tasks. A figure exactly at its budget passes. The figures checked:

- flips: the flip rate, mean_i [correct_P != correct_C] (Dutta et al. 2024), must be <= max-flips;
- KL: the mean KL(P ‖ C) over the options of multiple-choice questions; for tasks without options
  (generative ones) the mean per-token vocabulary KL when it was measured. KL over options is
  preferred because every report has it (``flipcheck compare`` has no vocabulary KL) and it is the
  distance on the decision the benchmark scores. Must be <= max-kl;
- Δacc = acc_C − acc_P must be >= min-acc-delta;
- acc_C must be >= min-acc;
- generations (:mod:`flipcheck.gate_generations`): S(T) >= share (``--min-survival 128:90%``) and the
  median length ratio child/parent <= ``--max-length-ratio``, both with ``--confidence`` bounds;
- the judged score change Δscore = mean(child − parent) on the 1-10 scale (``flipcheck judge`` or a
  recipe's ``judge:`` section; the pairwise net win rate where only pairwise verdicts exist) must be
  >= min-judge-delta, one verdict per judged child.

Text corpora (``--text``, perplexity tasks such as wikitext) get one verdict per child and corpus:

- KL text: the mean KL(P ‖ C) over every scored token must be <= max-kl-text;
- PPL ratio: PPL_C / PPL_P must be <= max-ppl-ratio (a plain ratio, e.g. 1.05).

With ``over_floor``, flips and every KL budget judge the excess over the noise floor (the
largest figure of its rows for the same task or corpus, ``--noise-floor``): a child passes
``--max-flips 1%`` when it flips at most one point more answers than numerics alone flip.

A figure the report does not have (no KL for that task) reads "n/a" and does not fail the verdict.
Non-finite outputs never pass: where the parent or the child had NaN/inf logits at a scored position,
or any KL was not finite, the KL counts as infinite and fails every KL budget.

Tasks are judged as the report names them: an lm-eval group such as ``mmlu`` is one verdict (a report
made with ``--per-subtask`` has one per subtask). Each verdict names the metric its figures use:
the report's headline (acc_norm where the task reports it), or `metric` ("acc" / "acc_norm") where
the task has that figure.

With ``confidence`` (``--confidence 0.95``) flips and Δacc are judged by one-sided confidence bounds
instead of their point estimates (flipcheck.evaluation.confidence): flips by the Clopper–Pearson upper
bound of (c→i + i→c) flips in n questions, Δacc by the lower bound of Tango's score interval for
paired proportions. A child passes when even that bound is inside the budget: 0 flips in 400
(bound 0.75 %) pass ``--max-flips 1%``; 1 flip in 100 (point 1 %, bound 4.7 %) fails ``--max-flips 2%``.
The counts are the task's pooled questions (a group averaged with other weights is bounded on its
pooled counts). KL and accuracy budgets stay point estimates.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.files import pct, signed_pct
from flipcheck.gate_generations import judge as judge_generation
from flipcheck.gate_generations import parse_length_ratio, parse_survival

TOLERANCE = 1e-9  # figures equal to a budget up to float rounding (0.49 - 0.5 != -0.01) pass
_BUDGET = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?%?$")


def parse_budget(text: str | float | int, name: str) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02, '-1%' -> -0.01; anything else is an error naming the option."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        if not _BUDGET.match(s):
            raise FlipcheckError(
                f"{name} {text!r}: expected a fraction (0.02) or a percentage (2%), optionally signed (-1%)"
            )
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    if not math.isfinite(value):
        raise FlipcheckError(f"{name} {text!r}: must be a finite number")
    return value


@dataclass
class Verdict:
    """Whether one child passes its budgets on one task (or over all its questions)."""

    child: str
    task: str
    passed: bool
    text: str  # one line: "PASS arc_easy: flips 1.2% <= 2.0%, KL 0.004 <= 0.01"
    failures: list[str] = field(default_factory=list)  # the checks that failed, e.g. ["flips"]
    metric: str | None = None  # the metric the figures were read under: acc, acc_norm, exact_match, ...


def _pct(x: float) -> str:
    return pct(x, 3, trim=True)


def _signed_pct(x: float) -> str:
    return signed_pct(x, 3, trim=True)


def _nonfinite(summary: Mapping[str, Any]) -> bool:
    """Whether any KL of the summary, or any scored position of parent or child, was NaN/inf."""
    counts = [(summary.get(k) or {}).get("nonfinite") for k in ("kl_options", "kl_vocab")]
    counts += list((summary.get("nonfinite") or {}).values())
    return any(isinstance(n, int | float) and n > 0 for n in counts)


def _kl(summary: Mapping[str, Any]) -> tuple[float | None, str]:
    """The KL the budget judges; infinite where any KL or scored position was not finite."""
    value, label = None, "KL"
    for key, name in (("kl_options", "KL"), ("kl_vocab", "KL vocab")):
        block = summary.get(key)
        if isinstance(block, Mapping) and block.get("mean") is not None:
            value, label = float(block["mean"]), name
            break
    if _nonfinite(summary):
        return math.inf, label + " (NaN/inf)"
    return value, label


def _figures(summary: Mapping[str, Any], metric: str | None) -> tuple[Mapping[str, Any], str]:
    """The summary's figures under `metric` where it has them (else its headline), and that metric's name."""
    block = (summary.get("by_metric") or {}).get(metric) if metric else None
    if isinstance(block, Mapping):
        return {**summary, **block}, str(metric)
    return summary, str(summary.get("metric") or summary.get("correct_metric") or "acc")


def _where(name: str, task: str, several: bool, summary: Mapping[str, Any], metric: str) -> str:
    label = f"{name} / {task}" if several else task
    extra = [metric] + ([f"filter {summary['filter']}"] if summary.get("filter") not in (None, "none") else [])
    return f"{label} [{', '.join(extra)}]"


def _bounds(summary: Mapping[str, Any], confidence: float | None) -> dict[str, float | None]:
    """The one-sided confidence bounds of flips (upper) and Δacc (lower) from the summary's counts."""
    from flipcheck.evaluation.confidence import cp_upper, delta_acc_lower

    n, b, c = summary.get("n"), summary.get("n_c2i"), summary.get("n_i2c")
    if confidence is None or not n or b is None or c is None:
        return {}
    n, b, c = int(n), int(b), int(c)
    return {"flips": cp_upper(b + c, n, confidence), "acc_delta": delta_acc_lower(b, c, n, confidence)}


def _shown(key: str, point: float, value: float, bounds: Mapping[str, Any], level: str, side: str,
           fmt: Callable[[float], str]) -> str:
    """'1.0% (95% upper 4.66%)' where a bound judged the figure; a note where counts were missing."""
    if key in bounds:
        return f"{fmt(point)} ({level} {side} {fmt(value)})"
    if level and key in ("flips", "acc_delta"):
        return f"{fmt(point)} (point estimate: the report has no counts)"
    return fmt(value)


def _judge(summary: Mapping[str, Any], budgets: Mapping[str, float | None],
           floor: Mapping[str, float | None] | None = None,
           confidence: float | None = None) -> tuple[list[str], list[str]]:
    parts, failures = [], []
    floor = floor or {}
    bounds = _bounds(summary, confidence)
    level = f"{confidence * 100:g}%" if confidence is not None else ""

    def upper(key: str, label: str, value: Any, budget: float | None, fmt: Callable[[float], str]) -> None:
        if budget is None:
            return
        if value is None:
            parts.append(f"{label} n/a")
            return
        base = floor.get(key)
        point, value = value, bounds.get(key, value)
        judged = value - base if base is not None and math.isfinite(value) else value
        ok = judged <= budget + TOLERANCE
        shown = _shown(key, point, value, bounds, level, "upper", fmt)
        shown = f"{shown} − floor {fmt(base)}" if base is not None else shown
        parts.append(f"{label} {shown} {'<=' if ok else '>'} {fmt(budget)}")
        if not ok:
            failures.append(key)

    def lower(key: str, label: str, value: Any, budget: float | None, fmt: Callable[[float], str]) -> None:
        if budget is None:
            return
        if value is None:
            parts.append(f"{label} n/a")
            return
        point, value = value, bounds.get(key, value)
        ok = value >= budget - TOLERANCE
        shown = _shown(key, point, value, bounds, level, "lower", fmt)
        parts.append(f"{label} {shown} {'>=' if ok else '<'} {fmt(budget)}")
        if not ok:
            failures.append(key)

    kl, kl_label = _kl(summary)
    upper("flips", "flips", summary.get("flips"), budgets["max_flips"], _pct)
    upper("kl", kl_label, kl, budgets["max_kl"], lambda x: f"{x:.4g}")
    lower("acc_delta", "Δacc", summary.get("delta_acc"), budgets["min_acc_delta"], _signed_pct)
    lower("acc", "acc", summary.get("acc_C"), budgets["min_acc"], _pct)

    more, failed = judge_generation(summary, budgets.get("min_survival"), budgets.get("max_length_ratio"), confidence)
    return parts + more, failures + failed


def check(
    report: Mapping[str, Any],
    max_flips: float | str | None = None,
    max_kl: float | str | None = None,
    min_acc_delta: float | str | None = None,
    min_acc: float | str | None = None,
    metric: str | None = None,
    max_kl_text: float | str | None = None,
    max_ppl_ratio: float | str | None = None,
    over_floor: bool = False,
    min_judge_delta: float | str | None = None,
    confidence: float | str | None = None,
    min_survival: str | None = None,
    max_length_ratio: float | str | None = None,
) -> list[Verdict]:
    """One verdict per child and named task or group (plus micro when a child has several), and one
    per child and text corpus when a corpus budget is given.

    `metric` ("acc" or "acc_norm") judges each task's figures under that metric where the task has
    it; default: the report's headline metric of each task. `over_floor` judges flips and KL as the
    excess over the report's noise floor. `confidence` (e.g. 0.95) judges flips by their one-sided
    Clopper–Pearson upper bound and Δacc by its one-sided lower bound instead of point estimates.
    """
    from flipcheck.evaluation.samples import check_metric

    check_metric(metric)
    if confidence is not None:
        from flipcheck.evaluation.confidence import check_confidence

        confidence = check_confidence(confidence)
    budgets, text_budgets, judge_budget = _parse_budgets(
        max_flips, max_kl, min_acc_delta, min_acc, min_survival, max_length_ratio, max_kl_text, max_ppl_ratio,
        min_judge_delta,
    )
    children = report.get("children") or []
    failed = [f for f in report.get("failed") or [] if f.get("status") == "failed"]
    if not children and not failed:
        raise FlipcheckError("gate: the report has no children to check")
    from flipcheck.evaluation.report.text import floor_entries

    if over_floor and not floor_entries(report):
        raise FlipcheckError("--over-floor: the report has no noise floor; make it with --noise-floor")
    if any(v is not None for v in text_budgets.values()) and not any(c.get("corpus") for c in children):
        raise FlipcheckError("--max-kl-text / --max-ppl-ratio: the report has no text corpora (--text or --tasks wikitext)")
    verdicts = [Verdict(child=str(f.get("name")), task="-", passed=False, failures=["failed"],
                        text=f"FAIL {f.get('name')}: not evaluated, the child failed ({f.get('reason')})") for f in failed]
    for child in children:
        name = str(child.get("name"))
        tasks = list((child.get("tasks") or {}).items())
        if len(tasks) > 1 and child.get("micro"):
            tasks.append(("all tasks (micro)", child["micro"]))
        for task, summary in tasks if any(v is not None for v in budgets.values()) else ():
            figures, used = _figures(summary, metric)
            floor = _task_floor(report, task, metric) if over_floor else None
            parts, failures = _judge(figures, budgets, floor, confidence)
            where = _where(name, task, len(children) > 1, summary, used)
            passed = not failures
            text = f"{'PASS' if passed else 'FAIL'} {where}: " + ", ".join(parts)
            verdicts.append(Verdict(child=name, task=task, passed=passed, text=text, failures=failures, metric=used))
        for corpus, fig in (child.get("corpus") or {}).items() if any(v is not None for v in text_budgets.values()) else ():
            parts, failures = _judge_text(fig, text_budgets, _text_floor(report, corpus) if over_floor else None)
            where = f"{name} / {corpus} [text]" if len(children) > 1 else f"{corpus} [text]"
            passed = not failures
            text = f"{'PASS' if passed else 'FAIL'} {where}: " + ", ".join(parts)
            verdicts.append(Verdict(child=name, task=corpus, passed=passed, text=text, failures=failures, metric="text"))
    if judge_budget is not None:
        verdicts += _judge_verdicts(children, judge_budget)
    return verdicts


def _parse_budgets(max_flips, max_kl, min_acc_delta, min_acc, min_survival, max_length_ratio, max_kl_text,
                   max_ppl_ratio, min_judge_delta) -> tuple[dict, dict, Any]:
    """(task budgets, text-corpus budgets, judge budget) parsed from the options; refuses none at all,
    a negative KL budget and a perplexity ratio that is not a positive number."""
    budgets = {
        "max_flips": None if max_flips is None else parse_budget(max_flips, "--max-flips"),
        "max_kl": None if max_kl is None else parse_budget(max_kl, "--max-kl"),
        "min_acc_delta": None if min_acc_delta is None else parse_budget(min_acc_delta, "--min-acc-delta"),
        "min_acc": None if min_acc is None else parse_budget(min_acc, "--min-acc"),
        "min_survival": parse_survival(min_survival),
        "max_length_ratio": parse_length_ratio(max_length_ratio),
    }
    text_budgets = {
        "max_kl_text": None if max_kl_text is None else parse_budget(max_kl_text, "--max-kl-text"),
        "max_ppl_ratio": None if max_ppl_ratio is None else parse_budget(max_ppl_ratio, "--max-ppl-ratio"),
    }
    judge_budget = None if min_judge_delta is None else _judge_budget(min_judge_delta)
    if all(v is None for v in (*budgets.values(), *text_budgets.values())) and judge_budget is None:
        raise FlipcheckError("gate: give at least one budget: --max-flips, --max-kl, --min-acc-delta, --min-acc, "
                             "--min-survival, --max-length-ratio, --max-kl-text, --max-ppl-ratio or --min-judge-delta")
    for key, opt in (("max_kl", "--max-kl"), ("max_kl_text", "--max-kl-text")):
        v = {**budgets, **text_budgets}[key]
        if v is not None and v < 0:
            raise FlipcheckError(f"{opt} {v!r}: KL is never negative; give a budget >= 0")
    if text_budgets["max_ppl_ratio"] is not None and (str(max_ppl_ratio).strip().endswith("%") or text_budgets["max_ppl_ratio"] <= 0):
        raise FlipcheckError(f"--max-ppl-ratio {max_ppl_ratio!r}: a ratio of perplexities, e.g. 1.05 (> 0)")
    return budgets, text_budgets, judge_budget


def _task_floor(report: Mapping[str, Any], task: str, metric: str | None) -> dict[str, float | None]:
    """The noise floor's largest flips and KL for `task` (micro: over all its questions)."""
    from flipcheck.evaluation.report.text import floor_entries

    flips, kls = [], []
    for e in floor_entries(report):
        s = e.get("micro") if task == "all tasks (micro)" else (e.get("tasks") or {}).get(task)
        if not s:
            continue
        figures, _ = _figures(s, metric)
        if figures.get("flips") is not None:
            flips.append(float(figures["flips"]))
        kl, _ = _kl(figures)
        if kl is not None:
            kls.append(kl)
    return {"flips": max(flips) if flips else None, "kl": max(kls) if kls else None}


def _text_kl(fig: Mapping[str, Any]) -> float | None:
    if any((fig.get("nonfinite") or {}).values()):
        return math.inf
    return ((fig.get("kl") or {}).get("mean"))


def _text_floor(report: Mapping[str, Any], corpus: str) -> dict[str, float | None]:
    from flipcheck.evaluation.report.text import floor_entries

    kls = [_text_kl(fig) for e in floor_entries(report) for n, fig in (e.get("corpus") or {}).items() if n == corpus]
    kls = [k for k in kls if k is not None]
    return {"kl_text": max(kls) if kls else None}


def _judge_text(fig: Mapping[str, Any], budgets: Mapping[str, float | None],
                floor: Mapping[str, float | None] | None) -> tuple[list[str], list[str]]:
    parts, failures = [], []
    kl = _text_kl(fig)
    if budgets["max_kl_text"] is not None:
        base = (floor or {}).get("kl_text")
        if kl is None:
            parts.append("KL text n/a")
        else:
            judged = kl - base if base is not None and math.isfinite(kl) else kl
            ok = judged <= budgets["max_kl_text"] + TOLERANCE
            shown = f"{kl:.4g} − floor {base:.4g}" if base is not None else f"{kl:.4g}"
            parts.append(f"KL text{' (NaN/inf)' if kl == math.inf else ''} {shown} {'<=' if ok else '>'} {budgets['max_kl_text']:.4g}")
            if not ok:
                failures.append("kl_text")
    if budgets["max_ppl_ratio"] is not None:
        pp, pc = fig.get("ppl_parent"), fig.get("ppl_child")
        bad = any((fig.get("nonfinite") or {}).values())
        ratio = math.inf if bad else (None if pp is None or pc is None else pc / pp)
        if ratio is None:
            parts.append("PPL ratio n/a")
        else:
            ok = ratio <= budgets["max_ppl_ratio"] + TOLERANCE
            parts.append(f"PPL ratio {ratio:.4f} {'<=' if ok else '>'} {budgets['max_ppl_ratio']:.4g}")
            if not ok:
                failures.append("ppl_ratio")
    return parts, failures


def _judge_budget(text: float | str) -> float:
    if isinstance(text, str) and text.strip().endswith("%"):
        raise FlipcheckError(f"--min-judge-delta {text!r}: a change in judged score points (1-10 scale), e.g. -0.5; not a percentage")
    return parse_budget(text, "--min-judge-delta")


def _judge_verdicts(children: list[Mapping[str, Any]], budget: float) -> list[Verdict]:
    """One verdict per judged child: its Δscore (else pairwise net win rate) against the budget."""
    from flipcheck.judge.stats import judge_delta

    judged = [c for c in children if c.get("judge")]
    if not judged:
        raise FlipcheckError("--min-judge-delta: no child in this report was judged (run flipcheck judge, or a recipe with a judge: section)")
    out = []
    for c in judged:
        name, d = str(c.get("name")), judge_delta(c["judge"])
        what = "Δscore" if (c["judge"].get("single") or {}).get("delta") is not None else "net win rate"
        if d is None:
            out.append(Verdict(child=name, task="judge", passed=True, text=f"PASS {name} [judge]: {what} n/a"))
            continue
        ok = d >= budget - TOLERANCE
        text = f"{'PASS' if ok else 'FAIL'} {name} [judge]: {what} {d:+.2f} {'>=' if ok else '<'} {budget:+.2f}"
        out.append(Verdict(child=name, task="judge", passed=ok, text=text, failures=[] if ok else ["judge_delta"]))
    return out


def run_gate(
    report: str | os.PathLike | Mapping[str, Any],
    *,
    max_flips: float | str | None = None,
    max_kl: float | str | None = None,
    min_acc_delta: float | str | None = None,
    min_acc: float | str | None = None,
    metric: str | None = None,
    max_kl_text: float | str | None = None,
    max_ppl_ratio: float | str | None = None,
    over_floor: bool = False,
    echo: Callable[[str], Any] | None = None,
    min_judge_delta: float | str | None = None,
    confidence: float | str | None = None,
    min_survival: str | None = None,
    max_length_ratio: float | str | None = None,
) -> bool:
    """Load a report (path or dict), check it, pass each verdict line to `echo`; True if all pass."""
    from flipcheck.evaluation.report import load_report

    data = report if isinstance(report, Mapping) else load_report(report)
    verdicts = check(data, max_flips=max_flips, max_kl=max_kl, min_acc_delta=min_acc_delta, min_acc=min_acc, metric=metric,
                     max_kl_text=max_kl_text, max_ppl_ratio=max_ppl_ratio, over_floor=over_floor,
                     min_judge_delta=min_judge_delta, confidence=confidence, min_survival=min_survival,
                     max_length_ratio=max_length_ratio)
    if echo is not None:
        for v in verdicts:
            echo(v.text)
    return all(v.passed for v in verdicts)
