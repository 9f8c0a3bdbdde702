"""From lm-eval's per-sample dicts to per-question rows (parent P vs child C) and per-task summaries.

The records are read by :mod:`flipcheck.evaluation.lm_eval_records` (which documents how each
kind of task is parsed: ``multiple_choice``, ``generate_until``, ``loglikelihood``); here the
parent's and the child's are joined on doc_id into :class:`SampleRow` (:func:`build_rows`) and
summarised per task, per group and over the run (flips, accuracies with bootstrap intervals, KL).

Perplexity tasks (``loglikelihood_rolling``) have no answers to flip and are refused.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import generations
from flipcheck.evaluation import metrics as M
from flipcheck.evaluation.clustered import clustered_figures
from flipcheck.evaluation.lm_eval_records import by_doc, check_pair, select_filter, settle_choice
from flipcheck.evaluation.rows import SampleRow
from flipcheck.evaluation.slices import first_difference_summary, slice_summaries, top_kl
from flipcheck.files import jsonable

log = logging.getLogger(__name__)

KINDS = ("multiple_choice", "generate_until", "loglikelihood")


def _as_row(r: SampleRow | Mapping[str, Any]) -> SampleRow:
    return r if isinstance(r, SampleRow) else SampleRow.from_dict(r)


def build_rows(
    task: str,
    parent: list[dict],
    child: list[dict],
    *,
    vocab: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
    filter_name: str | None = None,
) -> list[SampleRow]:
    """Join the parent's and the child's lm-eval samples of one task on doc_id into rows.

    Refuses (FlipcheckError naming the task and a doc_id) when the two runs cover different
    documents, when a document's ``doc_hash`` or ``prompt_hash`` differs (different dataset
    version, few-shot examples or chat template), or when the two disagree on the kind of task.
    `vocab` maps doc_id to (per-token vocabulary KL, per-token top-1 agreement) pooled over that
    document's requests. `filter_name` picks one of lm-eval's filters (e.g. ``strict-match`` of
    gsm8k); default: the first one in the samples. Every row records the filter it came through.
    """
    if not parent or not child:
        raise FlipcheckError(f"{task}: no samples from the {'parent' if not parent else 'child'}")
    filter_name, p_samples = select_filter(task, parent, filter_name, "parent")
    p_docs = by_doc(task, p_samples, "parent")
    c_docs = by_doc(task, select_filter(task, child, filter_name, "child")[1], "child")
    only_p, only_c = sorted(set(p_docs) - set(c_docs)), sorted(set(c_docs) - set(p_docs))
    if only_p or only_c:
        side, ids = ("parent", only_p) if only_p else ("child", only_c)
        raise FlipcheckError(
            f"{task}: parent and child cover different documents ({len(only_p)} only in the parent, "
            f"{len(only_c)} only in the child; e.g. doc_id {ids[0]} only in the {side}); run both with the same "
            "--limit and task version"
        )
    rows: list[SampleRow] = []
    mismatches = 0
    for doc_id in sorted(p_docs):
        p, c = p_docs[doc_id], c_docs[doc_id]
        check_pair(task, doc_id, p, c)
        kl = kl_rev = margin = None
        if p.kind == "multiple_choice":
            mismatches += settle_choice(task, p, c)
            kl = float(M.kl_options([p.ll], [c.ll])[0])
            kl_rev = float(M.kl_options([c.ll], [p.ll])[0])
            m = float(M.top_margin([p.ll])[0])
            margin = None if math.isnan(m) else m
        row = SampleRow(
            task=task, doc_id=doc_id, gold=p.gold, pred_P=p.pred, pred_C=c.pred,
            correct_P=bool(p.correct), correct_C=bool(c.correct), kl_options=kl, kl_vocab=None,
            top1_agree=None, margin_P=margin, output_P=p.output, output_C=c.output, kind=p.kind,
            ll_P=p.ll, ll_C=c.ll, choices=p.choices, pred_norm_P=p.pred_norm, pred_norm_C=c.pred_norm,
            correct_norm_P=p.correct_norm, correct_norm_C=c.correct_norm, question=p.question,
            metric=p.correct_metric, filter=filter_name, margin_norm_P=p.margin_norm, kl_options_rev=kl_rev,
            category=p.category, prompt_chars=p.prompt_chars,
            first_diff_char=M.first_difference(p.output, c.output) if p.kind == "generate_until" else None,
        )
        if vocab is not None and doc_id in vocab:
            attach_vocab(row, *vocab[doc_id])
        rows.append(row)
    if mismatches:
        log.warning(
            "%s: for %d samples the length-normalised prediction does not reproduce lm-eval's acc_norm "
            "(unusual target delimiter?); acc_norm correctness is taken from lm-eval", task, mismatches,
        )
    return rows

def attach_vocab(row: SampleRow, kl_tokens: Any, top1_tokens: Any | None = None, kl_rev_tokens: Any | None = None) -> SampleRow:
    """Set a row's vocabulary KL (both directions) and top-1 agreement from its per-token arrays (kept for pooling)."""
    kl = np.asarray(kl_tokens, dtype=np.float64).reshape(-1)
    top1 = None if top1_tokens is None else np.asarray(top1_tokens, dtype=np.float64).reshape(-1)
    rev = None if kl_rev_tokens is None else np.asarray(kl_rev_tokens, dtype=np.float64).reshape(-1)
    object.__setattr__(row, "_tokens", (kl, top1, rev))  # not a dataclass field: asdict/to_dict stay small
    rev_fin = rev[np.isfinite(rev)] if rev is not None else None
    row.kl_vocab_rev = float(rev_fin.mean()) if rev_fin is not None and rev_fin.size else None
    fin = kl[np.isfinite(kl)]
    row.kl_vocab = float(fin.mean()) if fin.size else None
    top1_fin = top1[np.isfinite(kl)] if top1 is not None and top1.shape == kl.shape else top1
    row.top1_agree = float(top1_fin.mean()) if top1_fin is not None and top1_fin.size else None
    row.n_tokens = int(kl.size)
    return row


# ---------------------------------------------------------------------------------------------
# summaries


def _accuracy_block(cp: np.ndarray, cc: np.ndarray, pp: list, pc: list, n_boot: int, seed: int) -> dict[str, Any]:
    b, c = M.discordant_counts(cp, cc)
    dirs = M.flip_directions(cp, cc)
    ci = M.bootstrap_delta_ci(cp, cc, n_boot=n_boot, seed=seed)
    return {
        "acc_P": M.accuracy(cp),
        "acc_C": M.accuracy(cc),
        "delta_acc": M.delta_accuracy(cp, cc),
        "delta_acc_ci": list(ci) if ci else None,
        "flips": M.flips(cp, cc),
        "flips_c2i": dirs[0] if dirs else None,
        "flips_i2c": dirs[1] if dirs else None,
        "n_c2i": b,
        "n_i2c": c,
        "answer_changes": M.answer_changes(pp, pc),
        "mcnemar_p": M.mcnemar_exact(b, c),
    }


def _vocab_rev_block(rows: list[SampleRow]) -> dict[str, Any] | None:
    """KL(C ‖ P) over the vocabulary at the scored tokens: mean, median, p99 (as :func:`_vocab_block`)."""
    measured = [r for r in rows if r.kl_vocab_rev is not None or r.n_tokens]
    arrays = [r.token_arrays() for r in measured]
    if measured and all(a is not None and a[2] is not None for a in arrays):
        return M.vocab_kl_summary(np.concatenate([a[2] for a in arrays]))
    done = [r for r in measured if r.kl_vocab_rev is not None]
    if not done:
        return None
    w = np.array([r.n_tokens or 1 for r in done], dtype=np.float64)
    kl = np.array([r.kl_vocab_rev for r in done], dtype=np.float64)
    return {"tokens": int(w.sum()), "nonfinite": None, "mean": float((kl * w).sum() / w.sum()), "median": None, "p99": None}


def _vocab_block(rows: list[SampleRow]) -> dict[str, Any] | None:
    measured = [r for r in rows if r.kl_vocab is not None or r.n_tokens]
    if not measured:
        return None
    arrays = [r.token_arrays() for r in measured]
    if all(a is not None for a in arrays):
        kl = np.concatenate([a[0] for a in arrays])
        tops = [a[1] for a in arrays]
        top1 = np.concatenate(tops) if all(t is not None for t in tops) else None
        return M.vocab_kl_summary(kl, top1)
    # rows read back from samples.jsonl: token-weighted means only
    w = np.array([r.n_tokens or 1 for r in measured], dtype=np.float64)
    kl = np.array([np.nan if r.kl_vocab is None else r.kl_vocab for r in measured])
    ok = np.isfinite(kl)
    top = np.array([np.nan if r.top1_agree is None else r.top1_agree for r in measured])
    tok = np.isfinite(top)
    return {
        "tokens": int(w.sum()),
        "nonfinite": None,
        "mean": float((kl[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else None,
        "median": None,
        "p99": None,
        "top1_agree": float((top[tok] * w[tok]).sum() / w[tok].sum()) if tok.any() else None,
    }


METRICS = ("acc", "acc_norm")  # the choices of --metric
_FIGURES = ("acc_P", "acc_C", "delta_acc", "flips", "flips_c2i", "flips_i2c", "answer_changes")


def check_metric(metric: str | None) -> str | None:
    if metric is not None and metric not in METRICS:
        raise FlipcheckError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    return metric


def _has_norm(rows: list[SampleRow]) -> bool:
    return bool(rows) and all(r.correct_norm_P is not None and r.correct_norm_C is not None for r in rows)


def set_headline(rows: list[SampleRow], metric: str | None = None, task: str | None = None) -> str:
    """Choose one task's headline metric and mark its rows; returns the metric's name.

    Default (`metric` None) follows what the task reports: acc_norm when lm-eval scored it, else
    acc (or the task's own metric, e.g. exact_match). ``acc`` forces acc; ``acc_norm`` on a task
    without it falls back to acc, and the summary says so.
    """
    check_metric(metric)
    use = "acc_norm" if _has_norm(rows) and metric != "acc" else None
    if metric == "acc_norm" and use is None and rows:
        log.info("%s reports no acc_norm; its figures use %s", task or rows[0].task, _row_metric(rows[0]))
    for r in rows:
        r.headline = use
    return use or (_row_metric(rows[0]) if rows else "acc")


def _row_metric(r: SampleRow) -> str:
    if r.headline == "acc_norm":
        return "acc_norm"
    return "acc" if r.metric in (None, "acc", "argmax") else r.metric


def _metric_block(rs: list[SampleRow], which: str, n_boot: int, seed: int) -> dict[str, Any]:
    """The accuracy figures, McNemar and margins with correctness read one way ("acc", "acc_norm", "headline")."""
    if which == "acc":
        views = [(r.correct_P, r.correct_C, r.pred_P, r.pred_C, r.margin_P) for r in rs]
    elif which == "acc_norm":
        views = [(r.correct_norm_P, r.correct_norm_C, r.pred_norm_P, r.pred_norm_C, r.margin_norm_P) for r in rs]
    else:
        views = [r.view() for r in rs]
    cp = np.array([v[0] for v in views], dtype=bool)
    cc = np.array([v[1] for v in views], dtype=bool)
    out = _accuracy_block(cp, cc, [_hashable(v[2]) for v in views], [_hashable(v[3]) for v in views], n_boot, seed)
    out["margin"] = _margin_block([v[4] for v in views], cp, cp != cc)
    return out


def _margin_block(margins: list[float | None], cp: np.ndarray, flipped: np.ndarray) -> dict[str, Any] | None:
    keep = [i for i, m in enumerate(margins) if m is not None]
    if not keep:
        return None
    m = np.array([margins[i] for i in keep], dtype=np.float64)
    mc, mi = M.margin_by_correctness(m, cp[keep])
    return {"mean": float(m.mean()), "mean_correct": mc, "mean_incorrect": mi,
            "deciles": M.flip_rate_by_margin_decile(m, flipped[keep])}


SLICE_KEYS = ("slices", "top_kl", "first_difference")  # the slice figures of a task summary (evaluation/slices.py)


def summarize_task(
    rows: Iterable[SampleRow | Mapping[str, Any]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    nonfinite: Mapping[str, int] | None = None,
    task: str | None = None,
    slices: bool = True,
) -> dict[str, Any]:
    """Every figure of the README's "What is measured" for one task (or any pooled set of rows).

    Keys: task, kind, n, metric (the headline metric: acc_norm, acc, exact_match, ...; a pooled set
    of tasks lists each), filter, correct_metric, acc_P, acc_C, delta_acc, delta_acc_ci [lo, hi]
    (paired bootstrap 95 %), flips, flips_c2i, flips_i2c, n_c2i, n_i2c, answer_changes, mcnemar_p,
    margin {mean, mean_correct, mean_incorrect, deciles} (all these under the headline metric: each
    row's, see set_headline), by_metric {"acc": {...}, "acc_norm": {...}} (the same figures under
    each metric, where the task reports acc_norm; else None), kl_options {mean, median, p95, p99,
    max, n, nonfinite}, kl_vocab {mean, median, p99, tokens, nonfinite, top1_agree}, top1_agree,
    identical_output (generative), nonfinite (as given). Unmeasured figures are None. With `slices`:
    slices, top_kl and first_difference (:mod:`flipcheck.evaluation.slices`).
    """
    rs = [_as_row(r) for r in rows]
    if not rs:
        raise FlipcheckError(f"{task or 'task'}: no rows to summarise")
    kinds = sorted({r.kind for r in rs})
    tasks = sorted({r.task for r in rs})
    out: dict[str, Any] = {
        "task": task or (tasks[0] if len(tasks) == 1 else "all"),
        "kind": kinds[0] if len(kinds) == 1 else "mixed",
        "n": len(rs),
        "metric": ", ".join(sorted({_row_metric(r) for r in rs})),
        "filter": ", ".join(sorted({r.filter for r in rs if r.filter})) or None,
    }
    by_metric = {m: _metric_block(rs, m, n_boot, seed) for m in METRICS} if _has_norm(rs) else None
    heads = {r.headline for r in rs}
    if by_metric and len(heads) == 1:
        out.update(by_metric[next(iter(heads)) or "acc"])
    else:
        out.update(_metric_block(rs, "headline", n_boot, seed))
    out["by_metric"] = by_metric
    out["kl_options"] = M.summary_stats([r.kl_options for r in rs])
    vb = _vocab_block(rs)
    out["kl_vocab"] = vb
    out["top1_agree"] = vb.get("top1_agree") if vb else None
    out["kl_options_rev"] = M.summary_stats([r.kl_options_rev for r in rs])
    out["kl_vocab_rev"] = _vocab_rev_block(rs)
    gen = [r for r in rs if r.kind == "generate_until"]
    out["identical_output"] = float(np.mean([r.output_P == r.output_C for r in gen])) if gen else None
    out["generation"] = generations.summary(gen)
    out["correct_metric"] = ", ".join(sorted({r.metric for r in rs if r.metric})) or None
    out["nonfinite"] = dict(nonfinite) if nonfinite else None
    if slices:
        out["slices"] = slice_summaries(rs, n_boot=n_boot, seed=seed)
        out["top_kl"] = top_kl(rs)
        out["first_difference"] = first_difference_summary(rs)
    return jsonable(out)


def summarize_group(
    name: str,
    leaf_rows: Mapping[str, list[SampleRow]],
    leaf_summaries: Mapping[str, dict[str, Any]],
    weights: Mapping[str, float] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """One row for an lm-eval group, aggregated as lm-eval aggregates it, its subtasks beneath.

    `weights` gives each subtask's share of the group's figures (they sum to 1), from the group's
    ``aggregate_metric_list``; None, or shares proportional to the subtasks' sizes
    (``weight_by_size``, lm-eval's default), pools the group's questions: every figure is then the
    micro figure over the group, with the bootstrap over its questions. Other shares (a group that
    averages its subtasks unweighted) give acc, Δacc, flips and answer changes as the weighted
    means of the subtasks' figures, with Δacc's interval from a bootstrap stratified by subtask;
    KL, margins and McNemar stay pooled over the group's questions.
    """
    rows_all = [r for t in leaf_rows for r in leaf_rows[t]]
    out = summarize_task(rows_all, n_boot=n_boot, seed=seed, task=name)
    sizes = {t: len(rs) for t, rs in leaf_rows.items() if rs}
    total = sum(sizes.values())
    pooled = weights is None or all(abs(weights.get(t, 0.0) - n / total) < 1e-9 for t, n in sizes.items())
    out["aggregation"] = "size-weighted" if pooled else "weighted mean of subtasks"
    out["weights"] = None if pooled else {t: float(weights.get(t, 0.0)) for t in sizes}
    if not pooled:
        _reweight(out, leaf_rows, leaf_summaries, weights, n_boot, seed)
    else:  # questions clustered by subtask: intervals that resample subtasks (evaluation.clustered)

        out["clustered"] = clustered_figures({t: ([r.view()[0] for r in rs], [r.view()[1] for r in rs])
                                              for t, rs in leaf_rows.items() if rs}, n_boot=n_boot, seed=seed)
    # the group row carries the slices (by subtask) and the largest-KL questions; its subtasks the figures
    out["subtasks"] = {t: {k: v for k, v in leaf_summaries[t].items() if k not in SLICE_KEYS} for t in leaf_summaries}
    return jsonable(out)


def _reweight(out: dict, leaf_rows: Mapping[str, list[SampleRow]], leaf_summaries: Mapping[str, dict],
              weights: Mapping[str, float], n_boot: int, seed: int) -> None:
    tasks = [t for t in leaf_rows if leaf_rows[t]]
    w = [float(weights.get(t, 0.0)) for t in tasks]

    def redo(block: dict, get, views) -> None:
        for k in _FIGURES:
            vals = [get(t).get(k) for t in tasks]
            block[k] = None if any(v is None for v in vals) else float(sum(a * b for a, b in zip(w, vals, strict=True)))
        strata = [(np.array([v[0] for v in views(t)], bool), np.array([v[1] for v in views(t)], bool)) for t in tasks]
        ci = M.stratified_bootstrap_delta_ci(strata, w, n_boot=n_boot, seed=seed)
        block["delta_acc_ci"] = list(ci) if ci else None

    redo(out, lambda t: leaf_summaries[t], lambda t: [r.view() for r in leaf_rows[t]])
    for m, block in (out.get("by_metric") or {}).items():
        if all((leaf_summaries[t].get("by_metric") or {}).get(m) for t in tasks):
            redo(block, lambda t, m=m: leaf_summaries[t]["by_metric"][m],
                 lambda t, m=m: [(r.correct_P, r.correct_C) if m == "acc" else (r.correct_norm_P, r.correct_norm_C)
                                 for r in leaf_rows[t]])
def _hashable(x: Any) -> Any:
    return json.dumps(x, sort_keys=True) if isinstance(x, list | dict) else x


MACRO_KEYS = ("acc_P", "acc_C", "delta_acc", "flips", "flips_c2i", "flips_i2c", "answer_changes",
              "top1_agree", "identical_output")


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def aggregate(
    summaries: Mapping[str, Mapping[str, Any]],
    rows_by_task: Mapping[str, Iterable[SampleRow | Mapping[str, Any]]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Figures over all tasks: ``micro`` pools every question of `rows_by_task` (each question weighs
    the same), ``macro`` averages the figures of `summaries`, the tasks as the user named them (each
    weighs the same: a group such as mmlu counts once, not once per subject).

    micro has the shape of a task summary (``task`` = "micro"); macro holds the means over tasks of
    acc_P, acc_C, delta_acc, flips, flips_c2i, flips_i2c, answer_changes, top1_agree,
    identical_output, and of the means of kl_options and kl_vocab (as ``{"mean": ...}``), over the
    tasks where each is measured, plus ``tasks`` (their number).
    """
    all_rows = [r for t in rows_by_task for r in rows_by_task[t]]
    micro = summarize_task(all_rows, n_boot=n_boot, seed=seed, task="micro", slices=False) if all_rows else None
    ss = list(summaries.values())
    macro: dict[str, Any] = {"task": "macro", "tasks": len(ss)}
    for k in MACRO_KEYS:
        macro[k] = _mean([s.get(k) for s in ss])
    for k in ("kl_options", "kl_vocab", "kl_options_rev", "kl_vocab_rev"):
        m = _mean([(s.get(k) or {}).get("mean") for s in ss])
        macro[k] = None if m is None else {"mean": m}
    return {"micro": micro, "macro": jsonable(macro)}
