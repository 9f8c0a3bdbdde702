"""Divergence over whole generations: parent P and child C writing from the same prompt.

Answer flips (Dutta et al. 2024, arXiv 2407.09141) judge only the answer lm-eval extracts from a
generation; what a shipped model does is write text token after token, and the damage of
compression compounds along the way. This module holds the figures of a generation as pure functions
of token arrays (no model):

- per question, with p = P's generated tokens and c = C's (both greedy, or both drawn with the same
  noise, from the same prompt ids; the end-of-sequence token, when generated, included):
  - the first divergent token d = min{t : p[t] != c[t]} (0-based, an index into P's generation;
    where one generation is a strict prefix of the other, d = the shorter length), or None when
    p == c;
  - teacher forcing along P's generation: the share of positions t where argmax C(·|prompt, p[:t])
    != p[t], and KL(P‖C), KL(C‖P) over the vocabulary at each such position;
  - the lengths |p|, |c| and how each generation ended: ``stop`` (end-of-sequence token or one of
    the task's stop sequences) or ``length`` (the task's token limit);
- per task: the survival curve S(t) = (1/n) Σ_i [d_i is None or d_i ≥ t], the share of questions
  whose child generation equals the parent's through token t (t = 1..T, T the longest generation);
  the median first divergent token (None when at least half the generations never diverge); the
  length ratio |c|/|p| (median, p90); the termination rates of both; the teacher-forced mismatch
  pooled over positions.

With ``--samples N`` (seed-synchronised sampling, :mod:`flipcheck.evaluation.sampling`) S(t), the
identical share, the first divergent token, the lengths and the matched share (positions holding the
same token, over the longer generation) pool every (question, sample) pair; teacher forcing follows
sample 0.

A question whose generations are identical survives every t: both stopped at the same token, so the
child equals the parent through any number of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FINISHES = ("stop", "length")  # how a generation ended: stop sequence / EOS, or the token limit
SURVIVAL_MARKS = (1, 8, 16, 32, 64, 128, 256, 512)  # the t at which tables show S(t)
_DIGITS = 4  # significant digits of the per-position KL kept on a samples row


def first_divergence(parent: Sequence[int], child: Sequence[int]) -> int | None:
    """The first index where the two token sequences differ (a strict prefix differs at its end), or None."""
    p = np.asarray(parent, dtype=np.int64).reshape(-1)
    c = np.asarray(child, dtype=np.int64).reshape(-1)
    m = min(p.size, c.size)
    diff = np.flatnonzero(p[:m] != c[:m])
    if diff.size:
        return int(diff[0])
    return None if p.size == c.size else m


def survival_curve(first: Iterable[int | None], horizon: int) -> list[float]:
    """S(t) for t = 1..horizon: the share of questions with d is None or d >= t (d = first divergent token)."""
    d = np.array([math.inf if x is None else float(x) for x in first], dtype=np.float64)
    if d.size == 0 or horizon < 1:
        return []
    t = np.arange(1, horizon + 1, dtype=np.float64)
    return [float(v) for v in (d[None, :] >= t[:, None]).mean(axis=1)]


def survival_at(curve: Sequence[float], t: int) -> float | None:
    """S(t) read off a curve for t = 1..len(curve); past its end the last value (every generation had ended)."""
    if t < 1:
        raise ValueError(f"survival at t={t}: t counts tokens from 1")
    if not curve:
        return None
    return float(curve[min(t, len(curve)) - 1])


def median_first_divergence(first: Iterable[int | None]) -> float | None:
    """The median of d over questions, a never-divergent question counting as +inf; None when that median is inf."""
    d = np.array([math.inf if x is None else float(x) for x in first], dtype=np.float64)
    if d.size == 0:
        return None
    med = float(np.median(d))  # inf when a middle value is inf (inf + x averages to inf, never NaN)
    return None if math.isinf(med) else med


def finish_reason(tokens: Sequence[int], max_new: int, eos_ids: set[int], stops: Sequence[str],
                  decode: Callable[[list[int]], str]) -> str:
    """``stop`` when the generation ended on an end-of-sequence token or a stop sequence (or before the
    limit), ``length`` when it ran to the token limit `max_new` without either."""
    toks = [int(t) for t in tokens]
    if len(toks) < max_new:
        return "stop"
    if toks and toks[-1] in eos_ids:
        return "stop"
    text = decode(toks)
    return "stop" if any(s and s in text for s in stops) else "length"


def _pair(p: np.ndarray, c: np.ndarray) -> dict[str, Any]:
    from flipcheck.evaluation.sampling import matched_share

    return {"first_divergent_token": first_divergence(p, c), "len_P": int(p.size), "len_C": int(c.size),
            "matched": matched_share(p, c)}


def question_figures(parent_tokens: Any, child_tokens: Any, *, tf_miss: Any = None, kl: Any = None,
                     kl_rev: Any = None, finish_p: str | None = None, finish_c: str | None = None,
                     extra: list[tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """The trajectory figures of one question (the ``generation`` field of its samples row); `extra`:
    the (parent, child) token lists of samples 1.. (``--samples N``), listed with sample 0 under ``samples``."""
    p = np.asarray(parent_tokens if parent_tokens is not None else [], dtype=np.int64).reshape(-1)
    c = np.asarray(child_tokens if child_tokens is not None else [], dtype=np.int64).reshape(-1)
    miss = None if tf_miss is None else np.asarray(tf_miss, dtype=bool).reshape(-1)
    samples = None
    if extra:
        samples = [_pair(p, c)] + [_pair(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in extra]
    return {
        **_pair(p, c),
        "samples": samples,
        "finish_P": finish_p,
        "finish_C": finish_c,
        "tf_positions": None if miss is None else int(miss.size),
        "tf_mismatch": None if miss is None or miss.size == 0 else float(miss.mean()),
        "kl": _rounded(kl),
        "kl_rev": _rounded(kl_rev),
    }


def _rounded(x: Any) -> list[float | None] | None:
    if x is None:
        return None
    out = []
    for v in np.asarray(x, dtype=np.float64).reshape(-1):
        out.append(None if not math.isfinite(v) else float(f"{v:.{_DIGITS}g}"))
    return out


def _quantile(x: np.ndarray, q: float) -> float | None:
    return float(np.quantile(x, q)) if x.size else None


def _rates(finishes: list[str | None]) -> dict[str, float] | None:
    known = [f for f in finishes if f in FINISHES]
    if not known:
        return None
    return {f: known.count(f) / len(known) for f in FINISHES}


def task_figures(questions: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per-task figures from the ``generation`` dicts of its questions (see the module docstring), or None."""
    qs = [q for q in questions if q]
    if not qs:
        return None
    pairs = [s for q in qs for s in (q.get("samples") or [q])]  # with --samples N: every (question, sample)
    first = [q.get("first_divergent_token") for q in pairs]
    horizon = max(max(int(q.get("len_P") or 0), int(q.get("len_C") or 0)) for q in pairs)
    curve = survival_curve(first, horizon)
    ratios = np.array([q["len_C"] / q["len_P"] for q in pairs if q.get("len_P")], dtype=np.float64)
    matched = [q["matched"] for q in pairs if q.get("matched") is not None]
    miss = [(q["tf_mismatch"], q["tf_positions"]) for q in qs if q.get("tf_mismatch") is not None]
    positions = sum(n for _, n in miss)
    return {
        "n": len(qs),
        "pairs": len(pairs),
        "matched": float(np.mean(matched)) if matched else None,
        "identical": float(np.mean([f is None for f in first])),
        "survival": curve,
        "survival_at": {str(t): survival_at(curve, t) for t in SURVIVAL_MARKS if curve},
        "median_first_divergent_token": median_first_divergence(first),
        "length_ratio": {"median": _quantile(ratios, 0.5), "p90": _quantile(ratios, 0.9), "n": int(ratios.size),
                         "sorted": [float(v) for v in np.sort(ratios)]},  # the gate bounds the median from these
        "mean_len_P": float(np.mean([q.get("len_P") or 0 for q in pairs])),
        "mean_len_C": float(np.mean([q.get("len_C") or 0 for q in pairs])),
        "termination_P": _rates([q.get("finish_P") for q in qs]),
        "termination_C": _rates([q.get("finish_C") for q in qs]),
        "tf_mismatch": (sum(m * n for m, n in miss) / positions) if positions else None,
        "tf_positions": positions,
    }


def attach(rows: Iterable[Any], parent_records: Mapping, child_records: Mapping) -> None:
    """Set ``row.generation`` on every generative row from the two models' ``generate_until`` records
    (keyed ``(task, doc_id, idx)``; a generative question is one request, idx 0)."""
    for row in rows:
        if getattr(row, "kind", None) != "generate_until":
            continue
        key = (row.task, row.doc_id, 0)
        p, c = parent_records.get(key), child_records.get(key)
        if p is None or c is None or p.kind != "generate_until" or c.kind != "generate_until":
            continue
        from flipcheck.evaluation.sampling import split_samples

        row.generation = question_figures(
            p.token_ids, c.token_ids, tf_miss=getattr(c, "tf_miss", None), kl=c.kl, kl_rev=c.kl_rev,
            finish_p=getattr(p, "finish", None), finish_c=getattr(c, "finish", None),
            extra=list(zip(split_samples(p), split_samples(c), strict=False)),
        )


def summary(rows: Iterable[Any]) -> dict[str, Any] | None:
    """The task block ``generation`` of a summary: :func:`task_figures` over the rows that have one."""
    return task_figures([g for g in (getattr(r, "generation", None) for r in rows) if g])
