"""Slices of one task's damage: flips and Δacc with intervals by subtask or category, prompt-length
tercile and the parent's margin decile; the questions with the largest KL, flipped or not; where two
generations first differ. Functions of a task's :class:`~flipcheck.evaluation.samples.SampleRow` list
(:func:`~flipcheck.evaluation.samples.summarize_task` calls them); md/html in ``report/slices.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flipcheck.evaluation import metrics as M
from flipcheck.evaluation.lm_eval_records import _py
from flipcheck.evaluation.samples import SampleRow

TOP_KL = 20  # questions listed per task by KL
LENGTH_BINS, MARGIN_BINS = 3, 10  # prompt-length terciles, parent-margin deciles


def _slice(label: str, views: list[tuple], n_boot: int, seed: int, **where: Any) -> dict[str, Any]:
    """The figures of one slice (correctness under each row's headline metric): n, acc_P, acc_C,
    delta_acc with its paired bootstrap 95 % interval, flips (count and rate) with its Wilson 95 %
    interval, and flips_c2i / flips_i2c as fractions of the slice."""
    cp = np.array([v[0] for v in views], dtype=bool)
    cc = np.array([v[1] for v in views], dtype=bool)
    n, k = int(cp.size), int((cp != cc).sum())
    ci = M.bootstrap_delta_ci(cp, cc, n_boot=n_boot, seed=seed) if n else None
    fci = M.proportion_ci(k, n)
    dirs = M.flip_directions(cp, cc)
    return {
        "slice": label, **where, "n": n, "acc_P": M.accuracy(cp), "acc_C": M.accuracy(cc),
        "delta_acc": M.delta_accuracy(cp, cc), "delta_acc_ci": list(ci) if ci else None,
        "n_flips": k, "flips": M.flips(cp, cc), "flips_ci": list(fci) if fci else None,
        "flips_c2i": dirs[0] if dirs else None, "flips_i2c": dirs[1] if dirs else None,
    }


def _binned(rs: list[SampleRow], values: list[float | None], n_bins: int, names: list[str], missing: str,
            n_boot: int, seed: int) -> list[dict[str, Any]] | None:
    """Slices by quantile bins of `values` (:func:`metrics.quantile_bins`); rows without a value go
    to a `missing` slice, so the slices' n add up to len(rs). None when fewer than two distinct
    values exist. A slice holds the values in [lo, hi) (the last one [lo, hi])."""
    have = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len({values[i] for i in have}) < 2:  # nothing to tell apart (every prompt equally long)
        return None
    edges, bins = M.quantile_bins([values[i] for i in have], n_bins)
    out = []
    for b in range(n_bins):
        idx = [have[j] for j in np.flatnonzero(bins == b)]
        out.append(_slice(names[b], [rs[i].view() for i in idx], n_boot, seed,
                          lo=float(edges[b]), hi=float(edges[b + 1])))
    rest = sorted(set(range(len(rs))) - set(have))
    if rest:
        out.append(_slice(missing, [rs[i].view() for i in rest], n_boot, seed, lo=None, hi=None))
    return out


def slice_summaries(rs: list[SampleRow], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One task's figures by slice; in every kind of slicing the slices' n add up to the task's n.

    - ``category``: by subtask when the rows come from several lm-eval tasks (a group), else by the
      doc's ``category`` (else ``subject``) field, rows without one under "(none)"; None when
      neither exists or every question has the same. ``by`` says which.
    - ``prompt_length``: terciles of the prompt's length in characters (the first request's
      context: few-shot examples included), edges ``lo``/``hi`` inclusive of ties.
    - ``margin``: deciles of the parent's top margin under the headline metric (multiple choice);
      a question without a margin (a generative task) has none, and the slicing is None.
    """
    tasks = sorted({r.task for r in rs})
    if len(tasks) > 1:
        by, key = "subtask", (lambda r: r.task)
    elif len({r.category for r in rs}) > 1:  # one category for every question says nothing
        by, key = "category", (lambda r: r.category if r.category is not None else "(none)")
    else:
        by, key = None, None
    category = None
    if key is not None:
        groups: dict[str, list[SampleRow]] = {}
        for r in rs:
            groups.setdefault(key(r), []).append(r)
        category = {"by": by, "slices": [_slice(name, [r.view() for r in groups[name]], n_boot, seed)
                                         for name in sorted(groups)]}
    lengths = [None if r.prompt_chars is None else float(r.prompt_chars) for r in rs]
    by_length = _binned(rs, lengths, LENGTH_BINS, ["short", "medium", "long"], "(unknown length)", n_boot, seed)
    margins = [r.view()[4] for r in rs]
    by_margin = _binned(rs, [None if m is None else float(m) for m in margins], MARGIN_BINS,
                        [f"d{i + 1}" for i in range(MARGIN_BINS)], "(no margin)", n_boot, seed)
    return {
        "category": category,
        "prompt_length": {"unit": "characters", "slices": by_length} if by_length else None,
        "margin": {"metric": "parent top margin (probability gap, best minus second-best option)",
                   "slices": by_margin} if by_margin else None,
    }


def _answer(r: SampleRow, pred: Any) -> Any:
    """An answer as text: the option's text for an option index, else the answer itself."""
    if isinstance(pred, int) and not isinstance(pred, bool) and r.choices and 0 <= pred < len(r.choices):
        return r.choices[pred]
    return pred


def row_kl(r: SampleRow) -> tuple[float, str] | None:
    """(KL, which) that ranks a question: KL over its options where it has options, else the mean
    vocabulary KL over its scored tokens (a generative task: teacher-forced on P's output)."""
    for value, which in ((r.kl_options, "options"), (r.kl_vocab, "vocabulary")):
        if value is not None and math.isfinite(value):
            return float(value), which
    return None


def top_kl(rs: list[SampleRow], k: int = TOP_KL) -> list[dict[str, Any]]:
    """The `k` questions with the largest KL (:func:`row_kl`), flipped or not, with both answers
    (under the headline metric) as text; ties broken by task and doc_id."""
    scored = []
    for r in rs:
        got = row_kl(r)
        if got is not None:
            scored.append((got[0], got[1], r))
    scored.sort(key=lambda t: (-t[0], t[2].task, t[2].doc_id))
    out = []
    for kl, which, r in scored[:k]:
        cp, cc, pp, pc, margin = r.view()
        out.append(_py({
            "task": r.task, "doc_id": r.doc_id, "kl": kl, "kl_of": which, "flipped": bool(cp) != bool(cc),
            "correct_P": bool(cp), "correct_C": bool(cc), "answer_P": _answer(r, pp), "answer_C": _answer(r, pc),
            "gold": _answer(r, r.gold), "margin_P": margin, "question": r.question,
        }))
    return out


def first_difference_summary(rs: list[SampleRow]) -> dict[str, Any] | None:
    """Generative rows: how many outputs are identical, and where the others first differ, as a
    character index into the raw generations (median, mean, min, max). None without generative rows."""
    gen = [r for r in rs if r.kind == "generate_until"]
    if not gen:
        return None
    pos = np.array([r.first_diff_char for r in gen if r.first_diff_char is not None], dtype=np.float64)
    return {"unit": "characters", "n": len(gen), "identical": sum(r.output_P == r.output_C for r in gen),
            "differ": int(pos.size), "median": float(np.median(pos)) if pos.size else None,
            "mean": float(pos.mean()) if pos.size else None, "min": int(pos.min()) if pos.size else None,
            "max": int(pos.max()) if pos.size else None}
