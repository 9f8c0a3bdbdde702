"""Reading lm-eval's per-sample records (in memory or from a ``--log_samples`` file) into parsed answers.

Input is what ``lm_eval.simple_evaluate(..., log_samples=True)["samples"][task]`` returns, or the
same records read back from a ``--log_samples`` JSONL file (where lm-eval has turned ``arguments``
into ``{"gen_args_i": {"arg_j": ...}}``, the responses into strings and the target into a string).
Both forms are accepted. The kind of task is read from the samples themselves:

- ``multiple_choice``: one ``(context, continuation)`` request per option, responses
  ``(loglikelihood, is_greedy)``; pred = argmax_j ll[j] and correctness is the sample's own ``acc``
  (so flipcheck agrees with lm-eval by construction). When the sample carries ``acc_norm``, the
  length-normalised variant pred_norm = argmax_j ll[j] / len(choice_j) (characters, as lm-eval) is
  kept too. Winogrande-style tasks (one continuation after several contexts: the options are the
  contexts) are recognised by their identical continuations; their options are the contexts' tails.
  The gold index is the target read as an option label first, then as an index, and must agree
  with lm-eval's own acc/acc_norm of both runs (the one that does is taken; for Winogrande-style
  tasks, whose logged target is the continuation, it is inferred from those marks).
- ``generate_until``: pred = the filtered answer, output = the raw generation, correctness from the
  task's ``exact_match`` (else its first numeric metric; a value >= 0.5 counts as correct, which
  is exact for 0/1 metrics).
- ``loglikelihood`` (one continuation, e.g. LAMBADA): pred = is_greedy, correctness from ``acc``.

Perplexity tasks (``loglikelihood_rolling``) have no answers to flip and are refused.

:func:`flipcheck.evaluation.samples.build_rows` joins the parent's and the child's parsed
records into per-question rows.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import metrics as M

log = logging.getLogger(__name__)

QUESTION_CHARS = 300  # tail of the prompt kept on each row, for the report's list of flipped questions


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


def _gold_candidates(target: Any, choices: list[str] | None) -> list[Any]:
    """What the target may mean as an option index (or list of them), most likely first.

    lm-eval turns a string target that names an option into that option's index, so a string is
    read as an option label before it is read as a number: with options "1".."4", target "3" is
    option 2. A --log_samples file writes an index 3 as "3" too; the caller keeps the candidate
    that agrees with lm-eval's own acc.
    """
    t = _py(target)
    if isinstance(t, bool) or t is None:
        return []
    if isinstance(t, int | list):
        return [t]
    if not isinstance(t, str):
        return []
    s = t.strip()
    out: list[Any] = []
    if choices is not None:
        for label in (t, s):
            if label in choices:
                out.append(choices.index(label))
                break
    if s.lstrip("-").isdigit():
        out.append(int(s))
    if s.startswith("["):
        try:
            out.append(json.loads(s))
        except ValueError:
            pass
    return [g for i, g in enumerate(out) if g not in out[:i]]


def _choices(conts: list[str]) -> list[str]:
    """Option texts: continuations minus lm-eval's default target delimiter (one leading space)."""
    if conts and all(isinstance(c, str) and c.startswith(" ") for c in conts):
        return [c[1:] for c in conts]
    return [str(c) for c in conts]


def _context_options(ctxs: list[str]) -> tuple[str, list[str]]:
    """(shared beginning, each context's own end) of Winogrande-style contexts, cut at a word boundary."""
    prefix = ctxs[0]
    for c in ctxs[1:]:
        n = 0
        while n < min(len(prefix), len(c)) and prefix[n] == c[n]:
            n += 1
        prefix = prefix[:n]
    cut = max(prefix.rfind(" "), prefix.rfind("\n")) + 1
    return ctxs[0][:cut], [c[cut:] for c in ctxs]


@dataclass
class _Parsed:
    doc_id: int
    kind: str
    gold: Any
    pred: Any
    correct: bool | None
    ll: list[float] | None = None
    choices: list[str] | None = None
    pred_norm: int | None = None
    correct_norm: bool | None = None
    margin_norm: float | None = None
    output: str | None = None
    question: str | None = None
    doc_hash: str | None = None
    prompt_hash: str | None = None
    correct_metric: str | None = None
    filter: str | None = None
    gold_candidates: list[Any] = field(default_factory=list)
    acc_seen: bool | None = None  # lm-eval's own acc / acc_norm of this sample (None: not reported)
    acc_norm_seen: bool | None = None
    category: str | None = None
    prompt_chars: int | None = None


CATEGORY_FIELDS = ("category", "subject")  # a doc field naming its category, the first one present


def _category(doc: Any) -> str | None:
    if not isinstance(doc, Mapping):
        return None
    for name in CATEGORY_FIELDS:
        value = doc.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


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
              "prompt_hash": s.get("prompt_hash"), "filter": str(s.get("filter", "none")),
              "category": _category(s.get("doc")), "prompt_chars": len(ctx) if ctx is not None else None}

    if kind == "loglikelihood_rolling":
        raise FlipcheckError(
            f"{task}: a perplexity task (loglikelihood_rolling) has no answers to flip; flipcheck compares "
            "multiple-choice, generative and single-continuation tasks"
        )
    if kind == "generate_until":
        return _parse_generation(task, s, resps, common)
    pairs = [_ll_pair(r) for r in resps]
    lls = [p[0] for p in pairs]
    if kind == "loglikelihood":
        greedy = pairs[0][1]
        acc = _number(s.get("acc"))
        return _Parsed(
            **common, gold=_py(s.get("target")), pred=greedy, correct=(acc > 0) if acc is not None else greedy,
            ll=lls, choices=_choices([a[1] for a in args]), correct_metric="acc" if acc is not None else "is_greedy",
        )
    return _parse_choice(s, args, lls, common)


def _parse_generation(task: str, s: Mapping[str, Any], resps: Any, common: dict[str, Any]) -> _Parsed:
    pred = resps[0] if isinstance(resps, list | tuple) and resps else resps
    while isinstance(pred, list | tuple) and pred:
        pred = pred[0]
    output = s.get("resps")
    while isinstance(output, list | tuple) and output:
        output = output[0]
    name = "exact_match" if _number(s.get("exact_match")) is not None else None
    if name is None:
        name = next((m for m in list(s.get("metrics") or []) if _number(s.get(m)) is not None), None)
    if name is None:
        raise FlipcheckError(f"{task}: doc {common['doc_id']} carries no numeric metric to judge correctness by")
    return _Parsed(
        **common, gold=_py(s.get("target")), pred=None if pred is None else str(pred),
        correct=_number(s[name]) >= 0.5, output=None if output is None else str(output), correct_metric=name,
    )


def _parse_choice(s: Mapping[str, Any], args: list[list[Any]], lls: list[float], common: dict[str, Any]) -> _Parsed:
    """A multiple-choice sample: one option per request, or Winogrande-style (one context per option)."""
    ctxs, conts = [a[0] for a in args], [a[1] for a in args]
    half = len(lls) // 2
    if "acc_mutual_info" in list(s.get("metrics") or []) and len(lls) % 2 == 0 and all(c == "" for c in ctxs[half:]):
        lls, ctxs, conts = lls[:half], ctxs[:half], conts[:half]  # lm-eval appended unconditional ("", option)
    multiple_input = len(set(conts)) == 1 and len(set(ctxs)) > 1
    if multiple_input:  # the options are the contexts; lm-eval normalises acc_norm by their length
        shared, choices = _context_options([str(c) for c in ctxs])
        common["question"] = (shared + "___" + str(conts[0]))[-QUESTION_CHARS:].strip()
        lengths = np.array([max(len(str(c)), 1) for c in ctxs], dtype=np.float64)
        candidates: list[Any] = []
    else:
        choices = _choices(conts)
        lengths = np.array([max(len(c), 1) for c in choices], dtype=np.float64)
        candidates = _gold_candidates(s.get("target"), choices)
    acc, acc_norm = _number(s.get("acc")), _number(s.get("acc_norm"))
    parsed = _Parsed(
        **common, gold=_py(s.get("target")), pred=int(np.argmax(lls)), correct=None if acc is None else acc > 0,
        ll=lls, choices=choices, correct_metric="acc" if acc is not None else "argmax", gold_candidates=candidates,
        acc_seen=None if acc is None else acc > 0, acc_norm_seen=None if acc_norm is None else acc_norm > 0,
    )
    if acc_norm is not None:
        normed = np.asarray(lls) / lengths
        parsed.pred_norm = int(np.argmax(normed))
        parsed.correct_norm = acc_norm > 0
        m = float(M.top_margin([normed])[0])
        parsed.margin_norm = None if math.isnan(m) else m
    return parsed


def _marks(*sides: _Parsed) -> list[tuple[int, bool]]:
    """(answer, judged right by lm-eval) for each side and each of acc / acc_norm it reports."""
    out = []
    for x in sides:
        out += [(x.pred, x.acc_seen)] if x.acc_seen is not None else []
        out += [(x.pred_norm, x.acc_norm_seen)] if x.acc_norm_seen is not None and x.pred_norm is not None else []
    return out


def _resolve_gold(task: str, p: _Parsed, c: _Parsed) -> Any:
    """The option index (or indices) that agrees with lm-eval's acc/acc_norm marks of both runs."""
    marks = _marks(p, c)

    def fits(g: Any) -> bool:
        return all(((pred in g) if isinstance(g, list) else pred == g) == ok for pred, ok in marks)

    for g in p.gold_candidates:
        if fits(g):
            return g
    right = {pred for pred, ok in marks if ok}
    wrong = {pred for pred, ok in marks if not ok}
    left = [j for j in range(len(p.ll or [])) if j not in wrong]
    for g in ([next(iter(right))] if len(right) == 1 else []) + (left if len(left) == 1 else []):
        if fits(g):
            return g
    if p.gold_candidates:
        if marks:
            log.debug("%s: doc %d: no reading of the target %r agrees with lm-eval's acc", task, p.doc_id, p.gold)
        return p.gold_candidates[0]
    return None if marks else p.gold


def select_filter(
    task: str, samples: list[Mapping[str, Any]], filter_name: str | None, who: str
) -> tuple[str, list[Mapping[str, Any]]]:
    """One lm-eval filter's samples. Default: the first filter, with a note when there are several.

    A requested filter that a task with a single filter lacks is not an error (``--filter
    strict-match`` leaves a multiple-choice task's only filter, ``none``, in place); a task with
    several filters must have it.
    """
    names = list(dict.fromkeys(str(s.get("filter", "none")) for s in samples))
    if filter_name is None or (filter_name not in names and len(names) == 1):
        if filter_name is None and len(names) > 1:
            log.info("%s: samples have filters %s; using %r (choose with --filter)", task, ", ".join(names), names[0])
        filter_name = names[0] if names else "none"
    elif filter_name not in names:
        raise FlipcheckError(
            f"{task}: no filter {filter_name!r} in the {who}'s samples; this task's filters: {', '.join(names)}"
        )
    return filter_name, [s for s in samples if str(s.get("filter", "none")) == filter_name]


def by_doc(task: str, samples: list[Mapping[str, Any]], who: str) -> dict[int, _Parsed]:
    out: dict[int, _Parsed] = {}
    for s in samples:
        p = _parse(task, s)
        if p.doc_id in out:
            raise FlipcheckError(f"{task}: the {who}'s samples hold doc_id {p.doc_id} twice")
        out[p.doc_id] = p
    return out


def check_pair(task: str, doc_id: int, p: _Parsed, c: _Parsed) -> None:
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


def settle_choice(task: str, p: _Parsed, c: _Parsed) -> int:
    """Set gold (and correctness where lm-eval gave no acc) on a multiple-choice pair; count norm mismatches."""
    gold = _resolve_gold(task, p, c)
    p.gold = c.gold = gold
    for x in (p, c):
        if x.correct is None:
            if not isinstance(gold, int | list):
                raise FlipcheckError(f"{task}: doc {x.doc_id} has neither an 'acc' value nor an option-index target")
            x.correct = x.pred in gold if isinstance(gold, list) else x.pred == gold
    return sum(
        x.correct_norm is not None and isinstance(gold, int) and (x.pred_norm == gold) != x.correct_norm for x in (p, c)
    )
