"""From lm-eval's per-sample dicts to per-question rows (parent P vs child C) and per-task summaries.

Input is what ``lm_eval.simple_evaluate(..., log_samples=True)["samples"][task]`` returns, or the
same records read back from a ``--log_samples`` JSONL file (where lm-eval has turned ``arguments``
into ``{"gen_args_i": {"arg_j": ...}}``, the responses into strings and the target into a string).
Both forms are accepted. The kind of task is read from the samples themselves:

- ``multiple_choice``: one ``(context, continuation)`` request per option, responses
  ``(loglikelihood, is_greedy)``; pred = argmax_j ll[j] and correctness is the sample's own ``acc``
  (so flipcheck agrees with lm-eval by construction). When the sample carries ``acc_norm``, the
  length-normalised variant pred_norm = argmax_j ll[j] / len(choice_j) (characters, as lm-eval) is
  kept too.
- ``generate_until``: pred = the filtered answer, output = the raw generation, correctness from the
  task's ``exact_match`` (else its first numeric metric; a value >= 0.5 counts as correct, which
  is exact for 0/1 metrics).
- ``loglikelihood`` (one continuation, e.g. LAMBADA): pred = is_greedy, correctness from ``acc``.

Perplexity tasks (``loglikelihood_rolling``) have no answers to flip and are refused.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import metrics as M

log = logging.getLogger(__name__)

KINDS = ("multiple_choice", "generate_until", "loglikelihood")
QUESTION_CHARS = 300  # tail of the prompt kept on each row, for the report's list of flipped questions


@dataclass
class SampleRow:
    """One question scored by the parent P and the child C (one line of samples.jsonl)."""

    task: str
    doc_id: int
    gold: Any  # the task's target: option index for multiple choice, reference text for generation
    pred_P: Any  # option index (multiple choice), answer text (generation) or is_greedy (loglikelihood)
    pred_C: Any
    correct_P: bool
    correct_C: bool
    kl_options: float | None  # KL(p_P ‖ p_C) over this question's options; None if not multiple choice
    kl_vocab: float | None  # mean vocabulary KL over this question's scored tokens; None if not measured
    top1_agree: float | None  # fraction of this question's scored tokens where argmax P == argmax C
    margin_P: float | None  # P's best minus second-best option probability
    output_P: str | None = None  # raw generations (generative tasks)
    output_C: str | None = None
    kind: str = "multiple_choice"
    ll_P: list[float] | None = None  # option log-likelihoods
    ll_C: list[float] | None = None
    choices: list[str] | None = None  # option texts (continuations without lm-eval's target delimiter)
    pred_norm_P: int | None = None  # length-normalised prediction, when the task reports acc_norm
    pred_norm_C: int | None = None
    correct_norm_P: bool | None = None
    correct_norm_C: bool | None = None
    n_tokens: int | None = None  # scored tokens behind kl_vocab / top1_agree
    question: str | None = None  # the end of the prompt, for reading the flipped questions
    metric: str | None = None  # what correctness was read from: acc, exact_match, ...

    @property
    def flipped(self) -> bool:
        return self.correct_P != self.correct_C

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleRow:
        """A row from a samples.jsonl line; unknown keys (such as ``child``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The per-token vocabulary KL and top-1 agreement behind kl_vocab (not serialised)."""
        return getattr(self, "_tokens", None)


def _as_row(r: SampleRow | Mapping[str, Any]) -> SampleRow:
    return r if isinstance(r, SampleRow) else SampleRow.from_dict(r)


# ---------------------------------------------------------------------------------------------
# reading lm-eval sample dicts (in-memory or from a --log_samples file)


def _arguments(sample: Mapping[str, Any]) -> list[list[Any]]:
    args = sample.get("arguments")
    if isinstance(args, Mapping):  # --log_samples file: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}

        def num(key: str) -> int:
            return int(key.rsplit("_", 1)[-1])

        return [[a[k] for k in sorted(a, key=num)] for _, a in sorted(args.items(), key=lambda kv: num(kv[0]))]
    if isinstance(args, list | tuple):
        return [list(a) if isinstance(a, list | tuple) else [a] for a in args]
    raise FlipcheckError("sample has no 'arguments' list: not an lm-eval per-sample record")


def _kind(args: list[list[Any]]) -> str:
    if not args:
        raise FlipcheckError("sample has no requests")
    first = args[0]
    if len(first) >= 2 and isinstance(first[1], Mapping):
        return "generate_until"
    if len(first) == 1:
        return "loglikelihood_rolling"
    return "multiple_choice" if len(args) >= 2 else "loglikelihood"


def _to_bool(x: Any) -> bool:
    if isinstance(x, str):
        if x in ("True", "true", "1"):
            return True
        if x in ("False", "false", "0"):
            return False
        raise FlipcheckError(f"expected a boolean is_greedy flag, got {x!r}")
    return bool(x)


def _ll_pair(x: Any) -> tuple[float, bool]:
    """(loglikelihood, is_greedy) from a filtered response: a pair, or a one-element list holding one."""
    while isinstance(x, list | tuple) and len(x) == 1:
        x = x[0]
    if not isinstance(x, list | tuple) or len(x) != 2:
        raise FlipcheckError(f"expected a (loglikelihood, is_greedy) response, got {x!r:.80}")
    try:
        return float(x[0]), _to_bool(x[1])
    except (TypeError, ValueError) as err:
        raise FlipcheckError(f"expected a (loglikelihood, is_greedy) response, got {x!r:.80}") from err


def _number(x: Any) -> float | None:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, int | float | np.integer | np.floating):
        return float(x)
    return None


def _py(x: Any) -> Any:
    """numpy scalars and tuples -> plain JSON types."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, list | tuple):
        return [_py(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _py(v) for k, v in x.items()}
    return x


def _gold(target: Any, choices: list[str] | None) -> Any:
    """The target as an option index (or list of them) where it is one; the raw target otherwise."""
    t = _py(target)
    if isinstance(t, str):
        s = t.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        if s.startswith("["):
            try:
                return json.loads(s)
            except ValueError:
                pass
        if choices is not None and t in choices:
            return choices.index(t)
    return t


def _choices(conts: list[str]) -> list[str]:
    """Option texts: continuations minus lm-eval's default target delimiter (one leading space)."""
    if conts and all(isinstance(c, str) and c.startswith(" ") for c in conts):
        return [c[1:] for c in conts]
    return [str(c) for c in conts]


@dataclass
class _Parsed:
    doc_id: int
    kind: str
    gold: Any
    pred: Any
    correct: bool
    ll: list[float] | None = None
    choices: list[str] | None = None
    pred_norm: int | None = None
    correct_norm: bool | None = None
    output: str | None = None
    question: str | None = None
    doc_hash: str | None = None
    prompt_hash: str | None = None
    norm_mismatch: bool = False
    correct_metric: str | None = None


def _parse(task: str, s: Mapping[str, Any]) -> _Parsed:
    if "doc_id" not in s or ("filtered_resps" not in s and "resps" not in s):
        raise FlipcheckError(f"{task}: sample lacks doc_id/resps: not an lm-eval per-sample record")
    doc_id = int(s["doc_id"])
    args = _arguments(s)
    kind = _kind(args)
    resps = s.get("filtered_resps", s.get("resps"))
    ctx = args[0][0] if args and isinstance(args[0][0], str) else None
    question = ctx[-QUESTION_CHARS:].strip() if ctx else None
    common = {"doc_id": doc_id, "kind": kind, "question": question, "doc_hash": s.get("doc_hash"),
              "prompt_hash": s.get("prompt_hash")}
    metric_names = list(s.get("metrics") or [])

    if kind == "loglikelihood_rolling":
        raise FlipcheckError(
            f"{task}: a perplexity task (loglikelihood_rolling) has no answers to flip; flipcheck compares "
            "multiple-choice, generative and single-continuation tasks"
        )

    if kind == "generate_until":
        pred = resps[0] if isinstance(resps, list | tuple) and resps else resps
        while isinstance(pred, list | tuple) and pred:
            pred = pred[0]
        output = s.get("resps")
        while isinstance(output, list | tuple) and output:
            output = output[0]
        name = "exact_match" if _number(s.get("exact_match")) is not None else None
        if name is None:
            name = next((m for m in metric_names if _number(s.get(m)) is not None), None)
        if name is None:
            raise FlipcheckError(f"{task}: doc {doc_id} carries no numeric metric to judge correctness by")
        return _Parsed(
            **common, gold=_py(s.get("target")), pred=None if pred is None else str(pred),
            correct=_number(s[name]) >= 0.5, output=None if output is None else str(output), correct_metric=name,
        )

    pairs = [_ll_pair(r) for r in resps]
    lls = [p[0] for p in pairs]
    conts = [a[1] for a in args]
    if kind == "loglikelihood":
        greedy = pairs[0][1]
        acc = _number(s.get("acc"))
        return _Parsed(
            **common, gold=_py(s.get("target")), pred=greedy, correct=(acc > 0) if acc is not None else greedy,
            ll=lls, choices=_choices(conts), correct_metric="acc" if acc is not None else "is_greedy",
        )

    half = len(lls) // 2
    if "acc_mutual_info" in metric_names and len(lls) % 2 == 0 and all(a[0] == "" for a in args[half:]):
        lls, conts = lls[:half], conts[:half]  # lm-eval appended the unconditional ("", option) requests
    choices = _choices(conts)
    gold = _gold(s.get("target"), choices)
    pred = int(np.argmax(lls))
    acc = _number(s.get("acc"))
    if acc is not None:
        correct, metric = acc > 0, "acc"
    elif isinstance(gold, int):
        correct, metric = pred == gold, "argmax"
    elif isinstance(gold, list):
        correct, metric = pred in gold, "argmax"
    else:
        raise FlipcheckError(f"{task}: doc {doc_id} has neither an 'acc' value nor an option-index target")
    parsed = _Parsed(**common, gold=gold, pred=pred, correct=bool(correct), ll=lls, choices=choices, correct_metric=metric)
    acc_norm = _number(s.get("acc_norm"))
    if acc_norm is not None:
        lengths = np.array([max(len(c), 1) for c in choices], dtype=np.float64)
        parsed.pred_norm = int(np.argmax(np.asarray(lls) / lengths))
        parsed.correct_norm = acc_norm > 0
        if isinstance(gold, int) and (parsed.pred_norm == gold) != parsed.correct_norm:
            parsed.norm_mismatch = True
    return parsed


def _select_filter(
    task: str, samples: list[Mapping[str, Any]], filter_name: str | None, who: str
) -> tuple[str, list[Mapping[str, Any]]]:
    names = list(dict.fromkeys(str(s.get("filter", "none")) for s in samples))
    if filter_name is None:
        if len(names) > 1:
            log.info("%s: samples have filters %s; using %r", task, ", ".join(names), names[0])
        filter_name = names[0] if names else "none"
    elif filter_name not in names:
        raise FlipcheckError(f"{task}: the {who}'s samples have no filter {filter_name!r}; present: {', '.join(names)}")
    return filter_name, [s for s in samples if str(s.get("filter", "none")) == filter_name]


def _by_doc(task: str, samples: list[Mapping[str, Any]], who: str) -> dict[int, _Parsed]:
    out: dict[int, _Parsed] = {}
    for s in samples:
        p = _parse(task, s)
        if p.doc_id in out:
            raise FlipcheckError(f"{task}: the {who}'s samples hold doc_id {p.doc_id} twice")
        out[p.doc_id] = p
    return out


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
    gsm8k); default: the first one in the samples.
    """
    if not parent or not child:
        raise FlipcheckError(f"{task}: no samples from the {'parent' if not parent else 'child'}")
    filter_name, p_samples = _select_filter(task, parent, filter_name, "parent")
    p_docs = _by_doc(task, p_samples, "parent")
    c_docs = _by_doc(task, _select_filter(task, child, filter_name, "child")[1], "child")
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
        if p.doc_hash and c.doc_hash and p.doc_hash != c.doc_hash:
            raise FlipcheckError(
                f"{task}: doc_id {doc_id} is a different document in the child's samples (doc_hash differs); "
                "were both run on the same dataset version?"
            )
        if p.prompt_hash and c.prompt_hash and p.prompt_hash != c.prompt_hash:
            raise FlipcheckError(
                f"{task}: doc_id {doc_id} was prompted differently for the child (prompt_hash differs); run both "
                "with the same num_fewshot, few-shot seed and chat template"
            )
        if p.kind != c.kind or (p.ll is not None and c.ll is not None and len(p.ll) != len(c.ll)):
            raise FlipcheckError(f"{task}: doc_id {doc_id} is scored differently by parent and child ({p.kind} vs {c.kind})")
        mismatches += p.norm_mismatch + c.norm_mismatch
        kl = margin = None
        if p.kind == "multiple_choice":
            kl = float(M.kl_options([p.ll], [c.ll])[0])
            m = float(M.top_margin([p.ll])[0])
            margin = None if math.isnan(m) else m
        row = SampleRow(
            task=task, doc_id=doc_id, gold=p.gold, pred_P=p.pred, pred_C=c.pred,
            correct_P=bool(p.correct), correct_C=bool(c.correct), kl_options=kl, kl_vocab=None,
            top1_agree=None, margin_P=margin, output_P=p.output, output_C=c.output, kind=p.kind,
            ll_P=p.ll, ll_C=c.ll, choices=p.choices, pred_norm_P=p.pred_norm, pred_norm_C=c.pred_norm,
            correct_norm_P=p.correct_norm, correct_norm_C=c.correct_norm, question=p.question,
            metric=p.correct_metric,
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


def attach_vocab(row: SampleRow, kl_tokens: Any, top1_tokens: Any | None = None) -> SampleRow:
    """Set a row's vocabulary KL and top-1 agreement from its per-token arrays (kept for pooling)."""
    kl = np.asarray(kl_tokens, dtype=np.float64).reshape(-1)
    top1 = None if top1_tokens is None else np.asarray(top1_tokens, dtype=np.float64).reshape(-1)
    object.__setattr__(row, "_tokens", (kl, top1))  # not a dataclass field: asdict/to_dict stay small
    fin = kl[np.isfinite(kl)]
    row.kl_vocab = float(fin.mean()) if fin.size else None
    row.top1_agree = float(top1.mean()) if top1 is not None and top1.size else None
    row.n_tokens = int(kl.size)
    return row


# ---------------------------------------------------------------------------------------------
# summaries


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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


def summarize_task(
    rows: Iterable[SampleRow | Mapping[str, Any]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    nonfinite: Mapping[str, int] | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """Every figure of SPEC §2 for one task (or any pooled set of rows), JSON-serialisable.

    Keys: task, kind, n, correct_metric, acc_P, acc_C, delta_acc, delta_acc_ci [lo, hi] (paired
    bootstrap 95 %), flips, flips_c2i, flips_i2c, n_c2i, n_i2c, answer_changes, mcnemar_p,
    kl_options {mean, median, p95, p99, max, n, nonfinite}, kl_vocab {mean, median, p99, tokens,
    nonfinite, top1_agree}, top1_agree, margin {mean_correct, mean_incorrect, deciles},
    identical_output (generative), norm (the acc_norm variant: the accuracy figures recomputed with
    length-normalised predictions), nonfinite (as given). Unmeasured figures are None.
    """
    rs = [_as_row(r) for r in rows]
    if not rs:
        raise FlipcheckError(f"{task or 'task'}: no rows to summarise")
    kinds = sorted({r.kind for r in rs})
    tasks = sorted({r.task for r in rs})
    cp = np.array([r.correct_P for r in rs], dtype=bool)
    cc = np.array([r.correct_C for r in rs], dtype=bool)
    pp, pc = [_hashable(r.pred_P) for r in rs], [_hashable(r.pred_C) for r in rs]
    out: dict[str, Any] = {
        "task": task or (tasks[0] if len(tasks) == 1 else "all"),
        "kind": kinds[0] if len(kinds) == 1 else "mixed",
        "n": len(rs),
    }
    out.update(_accuracy_block(cp, cc, pp, pc, n_boot, seed))
    out["kl_options"] = M.summary_stats([r.kl_options for r in rs])
    vb = _vocab_block(rs)
    out["kl_vocab"] = vb
    out["top1_agree"] = vb.get("top1_agree") if vb else None
    with_margin = [r for r in rs if r.margin_P is not None]
    if with_margin:
        m = np.array([r.margin_P for r in with_margin], dtype=np.float64)
        mp = np.array([r.correct_P for r in with_margin], dtype=bool)
        fl = np.array([r.flipped for r in with_margin], dtype=bool)
        mc, mi = M.margin_by_correctness(m, mp)
        out["margin"] = {
            "mean": float(m.mean()),
            "mean_correct": mc,
            "mean_incorrect": mi,
            "deciles": M.flip_rate_by_margin_decile(m, fl),
        }
    else:
        out["margin"] = None
    gen = [r for r in rs if r.kind == "generate_until"]
    out["identical_output"] = float(np.mean([r.output_P == r.output_C for r in gen])) if gen else None
    normed = [r for r in rs if r.correct_norm_P is not None and r.correct_norm_C is not None]
    if normed and len(normed) == len(rs):
        out["norm"] = _accuracy_block(
            np.array([r.correct_norm_P for r in rs], dtype=bool),
            np.array([r.correct_norm_C for r in rs], dtype=bool),
            [r.pred_norm_P for r in rs],
            [r.pred_norm_C for r in rs],
            n_boot,
            seed,
        )
    else:
        out["norm"] = None
    out["correct_metric"] = ", ".join(sorted({r.metric for r in rs if r.metric})) or None
    out["nonfinite"] = dict(nonfinite) if nonfinite else None
    return _clean(out)


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
    """Figures over all tasks: ``micro`` pools every question (each question weighs the same),
    ``macro`` averages the per-task figures (each task weighs the same).

    micro has the shape of a task summary (``task`` = "micro"); macro holds the means over tasks of
    acc_P, acc_C, delta_acc, flips, flips_c2i, flips_i2c, answer_changes, top1_agree,
    identical_output, and of the means of kl_options and kl_vocab (as ``{"mean": ...}``), over the
    tasks where each is measured, plus ``tasks`` (their number).
    """
    all_rows = [r for t in rows_by_task for r in rows_by_task[t]]
    micro = summarize_task(all_rows, n_boot=n_boot, seed=seed, task="micro") if all_rows else None
    ss = list(summaries.values())
    macro: dict[str, Any] = {"task": "macro", "tasks": len(ss)}
    for k in MACRO_KEYS:
        macro[k] = _mean([s.get(k) for s in ss])
    for k in ("kl_options", "kl_vocab"):
        m = _mean([(s.get(k) or {}).get("mean") for s in ss])
        macro[k] = None if m is None else {"mean": m}
    return {"micro": micro, "macro": _clean(macro)}
