"""Budgets on whole generations for the CI gate (figures: :mod:`flipcheck.evaluation.generations`).

    flipcheck gate runs/x/report.json --min-survival 128:90% --max-length-ratio 1.1 [--confidence 0.95]

- survival ``T:share``: S(T), the share of questions whose child generation equals the parent's
  through token T, must be >= share. Past the longest generation S(T) is the share of identical
  generations (every one had ended). With ``confidence`` c the one-sided Clopper–Pearson lower bound
  of S(T) judges instead: with k of n questions surviving, L = Beta⁻¹(1 − c; k, n − k + 1) (0 when
  k = 0). 400 of 400 surviving at 95 %: L = 0.05^(1/400) = 99.25 %.
- length ratio: the median over questions of |child generation| / |parent generation| (tokens) must
  be <= the budget (a plain ratio, 1.1 = ten per cent longer). With ``confidence`` c a
  distribution-free upper bound of the median judges instead: the order statistic x_(k) with k the
  smallest rank for which P(Bin(n, 1/2) <= k − 1) >= c (Thompson 1936; the true median lies below
  x_(k) with probability >= c); with too few questions for any such k the bound is infinite and fails.

Tasks without generations read "n/a" and do not fail, as every other figure a report lacks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from flipcheck.errors import FlipcheckError

TOLERANCE = 1e-9
_SURVIVAL = re.compile(r"^\s*(\d+)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*(%?)\s*$")
_RATIO = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*$")


def parse_survival(text: str | None, name: str = "--min-survival") -> tuple[int, float] | None:
    """'128:90%' or '128:0.9' -> (128, 0.9): T >= 1 tokens and a share in [0, 1]."""
    if text is None:
        return None
    m = _SURVIVAL.match(str(text))
    share = None
    if m:
        share = float(m.group(2)) / (100.0 if m.group(3) else 1.0)
    if not m or int(m.group(1)) < 1 or share is None or not 0.0 <= share <= 1.0:
        raise FlipcheckError(
            f"{name} {text!r}: expected TOKENS:SHARE, the share of generations identical through TOKENS tokens, "
            "e.g. 128:90% or 128:0.9 (TOKENS >= 1, SHARE between 0 and 100%)"
        )
    return int(m.group(1)), share


def parse_length_ratio(text: str | float | None, name: str = "--max-length-ratio") -> float | None:
    """'1.1' -> 1.1: a positive ratio of generated tokens, child over parent (not a percentage)."""
    if text is None:
        return None
    m = _RATIO.match(str(text))
    value = float(m.group(1)) if m else math.nan
    if not m or not math.isfinite(value) or value <= 0:
        raise FlipcheckError(
            f"{name} {text!r}: expected a ratio of generated tokens child / parent, e.g. 1.1 (> 0, not a percentage)"
        )
    return value


def survival_point(g: Mapping[str, Any], t: int) -> tuple[float, int, int] | None:
    """(S(t), surviving questions, questions) of a generation block."""
    from flipcheck.evaluation.generations import survival_at

    s = survival_at(g.get("survival") or [], t)
    n = int(g.get("n") or 0)
    if s is None or n == 0:
        return None
    return s, int(round(s * n)), n


def median_upper(sorted_values: list[float], confidence: float) -> float:
    """Distribution-free one-sided upper bound of the median (see the module docstring); inf when n is too small."""
    from scipy import stats

    n = len(sorted_values)
    for k in range(1, n + 1):
        if stats.binom.cdf(k - 1, n, 0.5) >= confidence:
            return float(sorted_values[k - 1])
    return math.inf


def judge(summary: Mapping[str, Any], survival: tuple[int, float] | None, max_ratio: float | None,
          confidence: float | None) -> tuple[list[str], list[str]]:
    """(verdict parts, failed checks) of one task summary against the generation budgets."""
    parts: list[str] = []
    failures: list[str] = []
    g = summary.get("generation")
    level = f"{confidence * 100:g}%" if confidence is not None else ""
    if survival is not None:
        t, share = survival
        point = survival_point(g, t) if g else None
        if point is None:
            parts.append(f"S({t}) n/a")
        else:
            s, k, n = point
            from flipcheck.evaluation.confidence import cp_lower

            value = cp_lower(k, n, confidence) if confidence is not None else s
            ok = value >= share - TOLERANCE
            shown = f"{100 * s:.3g}% ({level} lower {100 * value:.3g}%)" if confidence is not None else f"{100 * s:.3g}%"
            parts.append(f"S({t}) {shown} {'>=' if ok else '<'} {100 * share:.3g}%")
            if not ok:
                failures.append("survival")
    if max_ratio is not None:
        lr = (g or {}).get("length_ratio") or {}
        if lr.get("median") is None:
            parts.append("length ratio n/a")
        else:
            med = float(lr["median"])
            value = median_upper(lr.get("sorted") or [], confidence) if confidence is not None else med
            ok = value <= max_ratio + TOLERANCE
            shown = f"{med:.4g} ({level} upper {value:.4g})" if confidence is not None else f"{med:.4g}"
            parts.append(f"length ratio {shown} {'<=' if ok else '>'} {max_ratio:.4g}")
            if not ok:
                failures.append("length_ratio")
    return parts, failures
