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
- acc_C must be >= min-acc.

A figure the report does not have (no KL for that task) reads "n/a" and does not fail the verdict.
Non-finite outputs never pass: where the parent or the child had NaN/inf logits at a scored position,
or any KL was not finite, the KL counts as infinite and fails every KL budget.

Tasks are judged as the report names them: an lm-eval group such as ``mmlu`` is one verdict (a report
made with ``--per-subtask`` has one per subtask). Each verdict names the metric its figures use:
the report's headline (acc_norm where the task reports it), or `metric` ("acc" / "acc_norm") where
the task has that figure.
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


def _judge(summary: Mapping[str, Any], budgets: Mapping[str, float | None]) -> tuple[list[str], list[str]]:
    parts, failures = [], []

    def upper(key: str, label: str, value: Any, budget: float | None, fmt: Callable[[float], str]) -> None:
        if budget is None:
            return
        if value is None:
            parts.append(f"{label} n/a")
            return
        ok = value <= budget + TOLERANCE
        parts.append(f"{label} {fmt(value)} {'<=' if ok else '>'} {fmt(budget)}")
        if not ok:
            failures.append(key)

    def lower(key: str, label: str, value: Any, budget: float | None, fmt: Callable[[float], str]) -> None:
        if budget is None:
            return
        if value is None:
            parts.append(f"{label} n/a")
            return
        ok = value >= budget - TOLERANCE
        parts.append(f"{label} {fmt(value)} {'>=' if ok else '<'} {fmt(budget)}")
        if not ok:
            failures.append(key)

    kl, kl_label = _kl(summary)
    upper("flips", "flips", summary.get("flips"), budgets["max_flips"], _pct)
    upper("kl", kl_label, kl, budgets["max_kl"], lambda x: f"{x:.4g}")
    lower("acc_delta", "Δacc", summary.get("delta_acc"), budgets["min_acc_delta"], _signed_pct)
    lower("acc", "acc", summary.get("acc_C"), budgets["min_acc"], _pct)
    return parts, failures


def check(
    report: Mapping[str, Any],
    max_flips: float | str | None = None,
    max_kl: float | str | None = None,
    min_acc_delta: float | str | None = None,
    min_acc: float | str | None = None,
    metric: str | None = None,
) -> list[Verdict]:
    """One verdict per child and named task or group (plus micro when a child has several).

    `metric` ("acc" or "acc_norm") judges each task's figures under that metric where the task has
    it; default: the report's headline metric of each task.
    """
    from flipcheck.evaluation.samples import check_metric

    check_metric(metric)
    budgets = {
        "max_flips": None if max_flips is None else parse_budget(max_flips, "--max-flips"),
        "max_kl": None if max_kl is None else parse_budget(max_kl, "--max-kl"),
        "min_acc_delta": None if min_acc_delta is None else parse_budget(min_acc_delta, "--min-acc-delta"),
        "min_acc": None if min_acc is None else parse_budget(min_acc, "--min-acc"),
    }
    if all(v is None for v in budgets.values()):
        raise FlipcheckError("gate: give at least one budget: --max-flips, --max-kl, --min-acc-delta or --min-acc")
    if budgets["max_kl"] is not None and budgets["max_kl"] < 0:
        raise FlipcheckError(f"--max-kl {max_kl!r}: KL is never negative; give a budget >= 0")
    children = report.get("children") or []
    failed = [f for f in report.get("failed") or [] if f.get("status") == "failed"]
    if not children and not failed:
        raise FlipcheckError("gate: the report has no children to check")
    verdicts = [Verdict(child=str(f.get("name")), task="-", passed=False, failures=["failed"],
                        text=f"FAIL {f.get('name')}: not evaluated, the child failed ({f.get('reason')})") for f in failed]
    for child in children:
        name = str(child.get("name"))
        tasks = list((child.get("tasks") or {}).items())
        if len(tasks) > 1 and child.get("micro"):
            tasks.append(("all tasks (micro)", child["micro"]))
        for task, summary in tasks:
            figures, used = _figures(summary, metric)
            parts, failures = _judge(figures, budgets)
            where = _where(name, task, len(children) > 1, summary, used)
            passed = not failures
            text = f"{'PASS' if passed else 'FAIL'} {where}: " + ", ".join(parts)
            verdicts.append(Verdict(child=name, task=task, passed=passed, text=text, failures=failures, metric=used))
    return verdicts


def run_gate(
    report: str | os.PathLike | Mapping[str, Any],
    *,
    max_flips: float | str | None = None,
    max_kl: float | str | None = None,
    min_acc_delta: float | str | None = None,
    min_acc: float | str | None = None,
    metric: str | None = None,
    echo: Callable[[str], Any] | None = None,
) -> bool:
    """Load a report (path or dict), check it, pass each verdict line to `echo`; True if all pass."""
    from flipcheck.evaluation.report import load_report

    data = report if isinstance(report, Mapping) else load_report(report)
    verdicts = check(data, max_flips=max_flips, max_kl=max_kl, min_acc_delta=min_acc_delta, min_acc=min_acc, metric=metric)
    if echo is not None:
        for v in verdicts:
            echo(v.text)
    return all(v.passed for v in verdicts)
