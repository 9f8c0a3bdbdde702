"""Figures of a judged child, as pure functions of its per-prompt records.

A record is one prompt: ``{"id", "category", "parent_scores": [per turn, None if unparsed],
"child_scores": [...], "pair": "win" | "tie" | "loss" | None, ...}`` ("win" is the child's).

- Mean scores are over the turns where both the parent's and the child's rating parsed (a
  paired comparison); unparsed and failed ratings are counted, never averaged.
- Δscore = mean(child − parent) over those turns. Its 95% interval is a paired bootstrap that
  resamples prompts (a conversation's turns stay together): Δ* = Σ d[idx] / Σ n[idx] over the
  resampled prompts' summed differences d and paired turn counts n; percentiles 2.5 and 97.5.
- Win / tie / loss come from both orders (:func:`flipcheck.judge.grading.combine_orders`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flipcheck.evaluation.metrics import pearson
from flipcheck.evaluation.report.text import mean_of, overall_summary

MAX_WORST = 5  # prompts the child lost most, listed with both answers


def paired_turns(rec: Mapping[str, Any]) -> list[tuple[int, float, float]]:
    """(turn, parent score, child score) for the turns where both ratings parsed."""
    ps, cs = rec.get("parent_scores") or [], rec.get("child_scores") or []
    return [(t, float(p), float(c)) for t, (p, c) in enumerate(zip(ps, cs, strict=False)) if p is not None and c is not None]


def prompt_delta(rec: Mapping[str, Any]) -> float | None:
    pairs = paired_turns(rec)
    return sum(c - p for _, p, c in pairs) / len(pairs) if pairs else None


def cluster_bootstrap_ci(sums: Sequence[float], counts: Sequence[int], *, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of Σ sums[idx] / Σ counts[idx] over prompts resampled with replacement."""
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if s.size == 0 or n.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, s.size, size=(n_boot, s.size))
    num, den = s[idx].sum(axis=1), n[idx].sum(axis=1)
    stats = num[den > 0] / den[den > 0]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _means(recs: Sequence[Mapping[str, Any]], turn: int | None = None) -> dict[str, Any]:
    pairs = [(p, c) for r in recs for t, p, c in paired_turns(r) if turn is None or t == turn]
    if not pairs:
        return {"parent": None, "child": None, "delta": None, "n": 0}
    p = sum(x for x, _ in pairs) / len(pairs)
    c = sum(y for _, y in pairs) / len(pairs)
    return {"parent": p, "child": c, "delta": c - p, "n": len(pairs)}


def _count(records: Sequence[Mapping[str, Any]], side: str) -> tuple[int, int]:
    """(unparsed, failed) ratings of one side: a failed call has an error, an unparsed reply has none."""
    unparsed = failed = 0
    for r in records:
        scores = r.get(f"{side}_scores") or []
        errors = r.get(f"{side}_errors") or [None] * len(scores)
        for v, e in zip(scores, errors, strict=False):
            if e:
                failed += 1
            elif v is None:
                unparsed += 1
    return unparsed, failed


def single_summary(records: Sequence[Mapping[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Mean scores of parent and child, Δscore with its paired 95% interval, per category and per turn."""
    overall = _means(records)
    sums, counts = [], []
    for r in records:
        pairs = paired_turns(r)
        sums.append(sum(c - p for _, p, c in pairs))
        counts.append(len(pairs))
    cats: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        cats.setdefault(str(r.get("category") or "uncategorised"), []).append(r)
    n_turns = max((len(r.get("parent_scores") or []) for r in records), default=0)
    unparsed = {side: _count(records, side)[0] for side in ("parent", "child")}
    failed = {side: _count(records, side)[1] for side in ("parent", "child")}
    return {
        "parent_mean": overall["parent"], "child_mean": overall["child"], "delta": overall["delta"],
        "delta_ci": cluster_bootstrap_ci(sums, counts, seed=seed), "n": overall["n"],
        "answers": sum(len(r.get("child_scores") or []) for r in records),
        "unparsed": unparsed, "failed": failed,
        "per_category": {k: _means(v) for k, v in sorted(cats.items())},
        "per_turn": {str(t + 1): _means(records, t) for t in range(n_turns)} if n_turns > 1 else {},
    }


def pair_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Win / tie / loss of the child against the parent (both orders), with the unparsed and failed counted."""
    out = {"win": 0, "tie": 0, "loss": 0, "inconsistent": 0, "unparsed": 0, "failed": 0}
    for r in records:
        outcome = r.get("pair")
        if outcome in ("win", "tie", "loss"):
            out[outcome] += 1
            raw = r.get("pair_raw") or []
            if outcome == "tie" and len(raw) == 2 and "tie" not in raw:
                out["inconsistent"] += 1
        elif any(r.get("pair_errors") or []):
            out["failed"] += 1
        else:
            out["unparsed"] += 1
    n = out["win"] + out["tie"] + out["loss"]
    out["n"] = n
    out["win_rate"] = (out["win"] + 0.5 * out["tie"]) / n if n else None  # ties count half
    return out


def worst_prompts(records: Sequence[Mapping[str, Any]], limit: int = MAX_WORST) -> list[Mapping[str, Any]]:
    """The prompts the child lost most: lowest Δscore first, a pairwise loss before a non-loss at equal Δ."""
    def lost(r: Mapping[str, Any]) -> bool:
        d = prompt_delta(r)
        return (d is not None and d < 0) or r.get("pair") == "loss"

    def rank(r: Mapping[str, Any]) -> tuple[float, int]:
        d = prompt_delta(r)
        return (d if d is not None else 0.0, 0 if r.get("pair") == "loss" else 1)

    return sorted((r for r in records if lost(r)), key=rank)[:limit]


def judge_delta(judge: Mapping[str, Any] | None) -> float | None:
    """The child's Δscore (single grading), else its pairwise net win rate (wins − losses) / n."""
    if not judge:
        return None
    single = judge.get("single") or {}
    if single.get("delta") is not None:
        return float(single["delta"])
    pair = judge.get("pairwise") or {}
    if pair.get("n"):
        return (pair["win"] - pair["loss"]) / pair["n"]
    return None


def correlation(report: Mapping[str, Any]) -> dict[str, Any]:
    """Δscore against flips and against KL across the report's judged children (the paper's MT-Bench figure).

    Points are (child, Δscore, flips, KL) with flips and KL over all of the child's questions
    (micro, or its only task); KL over options where measured, else over the vocabulary.
    """
    points = []
    for c in report.get("children") or []:
        d = judge_delta(c.get("judge"))
        if d is None:
            continue
        s = overall_summary(c) or {}
        kl = mean_of(s.get("kl_options"))
        if kl is None:
            kl = mean_of(s.get("kl_vocab"))
        points.append({"child": str(c.get("name")), "delta": d, "flips": s.get("flips"), "kl": kl})
    what = "Δscore" if all((c.get("judge") or {}).get("single", {}).get("delta") is not None
                           for c in report.get("children") or [] if c.get("judge")) else "net win rate"
    with_flips = [p for p in points if p["flips"] is not None]
    with_kl = [p for p in points if p["kl"] is not None]
    out: dict[str, Any] = {"measure": what, "points": points,
                           "r_flips": pearson([p["delta"] for p in with_flips], [p["flips"] for p in with_flips]),
                           "r_kl": pearson([p["delta"] for p in with_kl], [p["kl"] for p in with_kl]),
                           "n_flips": len(with_flips), "n_kl": len(with_kl)}
    if not points:
        out["note"] = "no judged children"
    elif not with_flips and not with_kl:
        out["note"] = ("no flips or KL in this report (flipcheck judge alone evaluates no tasks; a recipe or sweep "
                       "with a judge: section has both), so no correlation")
    elif len(with_flips) < 3:
        out["note"] = f"{len(with_flips)} judged children with flips: a correlation needs at least 3 to say anything"
    return out
