"""`flipcheck eval PARENT CHILD --until-decided --max-flips 2% --confidence 0.95`: score questions in
seeded random batches and stop as soon as the flip budget is decided.

Each named task (a group such as ``mmlu`` pooled over its subjects, as the gate pools it) gets its
questions in one seeded random order (all its subtasks' questions shuffled together, by a generator
seeded with (seed, SHA-256 of the task name)). Every round scores the next ``batch`` questions of
each task not yet decided, parent and child, through the usual evaluator restricted to those doc ids
(lm-eval's ``samples=``; each leaf task run by its own name, so a subject without a question in the
round is not scored whole), adds their flips to the task's running count, and asks the betting
confidence sequence of :mod:`.sequential` for a verdict: PASS once its upper bound is within the
budget, FAIL once its lower bound is over it. The run stops when every task passed, when one failed
(the gate fails on any task), or when the questions run out (then the last upper bound judges, as
the gate would, and the report says it ran out). Each round's parent scores are cached like any
other (the key holds the round's doc ids), so a rerun with the same seed is scored from the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.files import jsonable, write_json_atomic
from flipcheck.gate import _figures, parse_budget

log = logging.getLogger(__name__)
Say = Callable[[str], None]


def check_options(max_flips: str | None, confidence: str | None, batch: int) -> tuple[float, float]:
    """The budget and confidence `--until-decided` needs, checked before any model loads."""
    from flipcheck.evaluation.confidence import check_confidence

    if max_flips is None or confidence is None:
        raise FlipcheckError("--until-decided decides a flip budget: give --max-flips (e.g. 2%) and --confidence (e.g. 0.95)")
    budget = parse_budget(max_flips, "--max-flips")
    if not (0.0 < budget < 1.0):
        raise FlipcheckError(f"--max-flips {max_flips!r}: a flip rate between 0 and 1 (exclusive), e.g. 2%")
    if batch < 1:
        raise FlipcheckError(f"--batch-questions {batch}: must be >= 1")
    return budget, check_confidence(confidence)


def question_order(counts: Mapping[str, Mapping[str, int]], seed: int) -> dict[str, list[tuple[str, int]]]:
    """Per named task, every (leaf task, doc id) in one seeded random order."""
    from flipcheck.decide.splits import _rng

    out = {}
    for unit, leaves in counts.items():
        items = [(leaf, i) for leaf, n in sorted(leaves.items()) for i in range(n)]
        perm = _rng(seed, unit).permutation(len(items))
        out[unit] = [items[k] for k in perm]
    return out


def _round_counts(entry: Mapping[str, Any], leaves: Sequence[str], metric: str | None) -> tuple[int, int]:
    """(flips, questions) summed over the leaves scored this round, under the gate's metric."""
    flips = n = 0
    for leaf in leaves:
        fig, _ = _figures(entry["tasks"][leaf], metric)
        flips += int(fig["n_c2i"]) + int(fig["n_i2c"])
        n += int(fig["n"])
    return flips, n


def until_decided(parent: str, child: str, *, tasks: Sequence[str], max_flips: str, confidence: str, batch: int = 100,
                  seed: int = 1234, include_path=None, limit: float | None = None, metric: str | None = None,
                  cache_dir=None, use_cache: bool = True, say: Say | None = None, **settings: Any) -> dict[str, Any]:
    """Score `child` against `parent` round by round until every named task's flip budget is decided
    (module docstring). Returns the ``until_decided`` block: per task the questions used of the total,
    flips, both bounds and the verdict; overall the verdict, questions used and rounds."""
    from flipcheck.decide.confirm import question_units
    from flipcheck.decide.sequential import Sequence as FlipSequence
    from flipcheck.decide.splits import question_counts
    from flipcheck.evaluation import cache as cache_mod
    from flipcheck.evaluation.model_ref import child_ref
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef
    from flipcheck.models import resolve_source

    say = say or (lambda m: log.info("%s", m))
    budget, conf = check_options(max_flips, confidence, batch)
    units = question_units(list(tasks), include_path)
    if not units:
        raise FlipcheckError("--until-decided needs question tasks (--tasks), not text corpora alone")
    order = question_order(question_counts(units, include_path, limit), seed)
    parent_ref = ModelRef("parent", resolve_source(parent))
    child = child_ref(child)
    cache = cache_mod.ResultCache(cache_dir, enabled=use_cache)
    seqs = {u: FlipSequence(budget, 1.0 - conf) for u in units}
    pos = dict.fromkeys(units, 0)
    rounds = 0
    while True:
        live = [u for u in units if seqs[u].decided is None and pos[u] < len(order[u])]
        if not live or any(s.decided == "fail" for s in seqs.values()):
            break
        picked = {u: order[u][pos[u]: pos[u] + batch] for u in live}
        samples: dict[str, list[int]] = {}
        for items in picked.values():
            for leaf, i in items:
                samples.setdefault(leaf, []).append(i)
        samples = {leaf: sorted(ids) for leaf, ids in samples.items()}
        ev_settings = EvalSettings(tasks=sorted(samples), include_path=include_path, seed=seed, metric=metric,
                                   doc_ids=samples, **settings)
        entry, _ = Evaluator(parent_ref, ev_settings, cache).evaluate_child(child)
        rounds += 1
        for u, items in picked.items():
            leaves = sorted({leaf for leaf, _ in items})
            flips, n = _round_counts(entry, leaves, metric)
            pos[u] += len(items)
            seqs[u].add(flips, n)
            lo, hi = seqs[u].bounds()
            say(f"round {rounds}: {u} {seqs[u].flips}/{seqs[u].n} flips, bounds [{lo:.2%}, {hi:.2%}] "
                f"-> {(seqs[u].decided or 'undecided').upper()}")
    return _block(units, seqs, pos, order, budget, conf, batch, seed, rounds)


def _block(units, seqs, pos, order, budget: float, conf: float, batch: int, seed: int, rounds: int) -> dict[str, Any]:
    from flipcheck.evaluation.confidence import plan_questions

    per: dict[str, Any] = {}
    for u in units:
        s = seqs[u]
        lo, hi = s.bounds()
        ran_out = s.decided is None and pos[u] >= len(order[u])
        if s.decided is not None:
            final = s.decided
        elif ran_out:  # judged by the last upper bound, as the gate judges
            final = "pass" if hi <= budget else "fail"
        else:  # not scored further: another task failed first
            final = "undecided"
        per[u] = {"n_used": s.n, "n_total": len(order[u]), "flips": s.flips, "flip_rate": s.flips / s.n if s.n else None,
                  "lower": lo, "upper": hi, "verdict": final, "decided": s.decided is not None, "ran_out": ran_out}
    verdicts = [p["verdict"] for p in per.values()]
    overall = "fail" if "fail" in verdicts else ("pass" if all(v == "pass" for v in verdicts) else "fail")
    used, total = sum(p["n_used"] for p in per.values()), sum(p["n_total"] for p in per.values())
    plan = plan_questions(budget, budget / 2, conf).questions  # the fixed n for a child at half the budget
    return {"budget": budget, "confidence": conf, "batch": batch, "seed": seed, "verdict": overall, "rounds": rounds,
            "questions_used": used, "questions_total": total, "plan_n_at_half_budget": plan,
            "method": "betting confidence sequence (Waudby-Smith & Ramdas 2024), anytime-valid", "tasks": per}


def lines(block: Mapping[str, Any]) -> list[str]:
    """The terminal's verdict lines."""
    out = []
    for u, p in block["tasks"].items():
        how = "ran out of questions" if p["ran_out"] else ("decided" if p["decided"] else "stopped: another task failed")
        rate = "n/a" if p["flip_rate"] is None else f"{p['flip_rate']:.2%}"
        out.append(f"{p['verdict'].upper()} {u}: flips {rate} ({p['flips']}/{p['n_used']} of {p['n_total']} questions), "
                   f"{block['confidence']:.0%} anytime bounds [{p['lower']:.2%}, {p['upper']:.2%}] vs budget "
                   f"{block['budget']:.2%}; {how}")
    out.append(f"{block['verdict'].upper()}: {block['questions_used']} of {block['questions_total']} questions in "
               f"{block['rounds']} round(s) of {block['batch']} per task (a fixed-n plan for a child at half the budget: "
               f"{block['plan_n_at_half_budget']} per task)")
    return out


def write(out: str | Path, block: Mapping[str, Any]) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "report.json", {"schema": "flipcheck.until_decided", "version": 1,
                                               "until_decided": jsonable(dict(block))})
    return folder / "report.json"

