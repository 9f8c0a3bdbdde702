"""Confirmation: the search's passing candidates judged again, smallest first, on questions it never saw.

The search proposes and verifies on the search split only (:mod:`.splits`), its budgets judged at the
tightened confidence c_s. Then the candidates that passed there are taken smallest first (ties: the
lower judged figure) and each is evaluated on the confirmation split (a seeded, stratified share of
the questions, or the separate ``--confirm-tasks``) and judged by the same gate at the user's own
confidence c. The first that passes is the winner; one that fails is reported with both splits'
figures and the next smallest is confirmed, until one passes or none is left (no winner, exit 1).
Every child is the folder the search made: confirming compresses nothing, and its evaluation is
cached like any other (the parent's key holds the split's doc ids, so the two splits never share
an entry).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flipcheck.decide.budgets import Budgets
from flipcheck.decide.splits import (
    Split,
    check_decidable,
    parse_confirm,
    question_counts,
    search_confidence,
    split_questions,
)
from flipcheck.evaluation.tasks import resolve_tasks, task_tree

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Confirmation:
    """What the confirmation judges: its evaluation settings, the user's budgets, and the split."""

    budgets: Budgets  # at the user's confidence
    search_confidence: float | None  # the tightened one the search split was judged at
    candidates: int  # K of the Bonferroni rule
    split: Split | None = None  # None: separate confirmation tasks
    tasks: list[str] = dataclasses.field(default_factory=list)  # --confirm-tasks

    def settings(self, base):
        """The confirmation's EvalSettings: the search's, on the confirmation split (or tasks), without texts."""
        if self.split is not None:
            return base.replace(doc_ids=self.split.confirm, texts=[])
        return base.replace(tasks=list(self.tasks), doc_ids=None, texts=[])

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"confidence": self.budgets.confidence, "search_confidence": self.search_confidence,
                               "candidates_bound": self.candidates,
                               "rule": "search split judged at 1 - (1 - c) / K (Bonferroni over K = --max-candidates); "
                                       "confirmation split at c, once per confirmed candidate"}
        if self.split is not None:
            out.update(mode="split", split=self.split.to_dict())
        else:
            out.update(mode="tasks", tasks=self.tasks)
        return out


def _figures(entry: Mapping[str, Any]) -> dict[str, Any]:
    from flipcheck.decide.search_loop import _task_figures

    return {"tasks": {t: _task_figures(s) for t, s in (entry.get("tasks") or {}).items()},
            "micro": _task_figures(entry["micro"]) if entry.get("micro") else None}


def confirm(search, block: dict[str, Any], conf: Confirmation, say: Callable[[str], None]) -> dict[str, Any]:
    """Judge the search's passing candidates on the confirmation split, smallest first (module
    docstring); update `block` in place (winner, each row's ``confirmation``) and return its
    ``confirmation`` section."""
    from flipcheck.evaluation.model_ref import child_ref
    from flipcheck.evaluation.runner import Evaluator, ModelRef
    from flipcheck.orchestrate.children import evaluate_children

    run, method = search.run, search.space.method
    settings = conf.settings(run.evaluator.settings)
    parent = ModelRef("parent", run.parent_src, tokenizer=run.tokenizer, fingerprint=run.parent_fp,
                      engine=settings.engine_of("parent"))
    ev = Evaluator(parent, settings, run.cache)
    ev.on_step = search.step
    passing = [c for c in search.candidates if c.passed and c.size(method) is not None]
    order = sorted(passing, key=lambda c: (c.size(method), c.figure if c.figure is not None else 0.0))
    rows = {r["name"]: r for r in block["candidates"]}
    judged: list[dict[str, Any]] = []
    winner = None
    for c in order:
        say(f"confirming {c.name} on the confirmation {'split' if conf.split is not None else 'tasks'}")
        ref = child_ref(c.folder, name=c.name, engine=settings.engine_of("child"))
        outcome = evaluate_children(search.executor, ev, [ref], search.work / "confirm", say)
        if outcome.failed or not outcome.entries:
            reason = outcome.failed[0].get("reason") if outcome.failed else "no result"
            judged.append({"name": c.name, "passed": False, "verdicts": [f"FAIL: not evaluated ({reason})"], "figure": None})
            continue
        entry = outcome.entries[0]
        passed, verdicts = conf.budgets.verdicts(entry)
        result = {"name": c.name, "passed": passed, "verdicts": verdicts, "figure": conf.budgets.figure(entry), **_figures(entry)}
        judged.append(result)
        say(f"{c.name}: confirmation {'PASS' if passed else 'FAIL'}  " + "; ".join(verdicts))
        if passed:
            winner = c
            break
    search.clock.close()
    for r in block["candidates"]:
        r["search_winner"] = r.get("winner", False)
        r["winner"] = winner is not None and r["name"] == winner.name
        r["confirmation"] = None
    for j in judged:
        rows[j["name"]]["confirmation"] = {k: v for k, v in j.items() if k != "name"}
    rejected = {j["name"] for j in judged if not j["passed"]}  # the reference: a uniform child not rejected here
    uniform = [c for c in passing if c.kind == "uniform" and c.name not in rejected]
    block["best_uniform"] = min(uniform, key=lambda c: c.size(method)).name if uniform else None
    block["search_winner"] = block.get("winner")
    block["winner"] = winner.name if winner is not None else None
    section = {**conf.describe(), "confirmed": [j["name"] for j in judged], "winner": block["winner"]}
    block["confirmation"] = section
    return section


def confirmed_rows(block: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The candidates judged on the confirmation split, in the order they were judged."""
    by = {c["name"]: c for c in block.get("candidates", [])}
    return [by[n] for n in (block.get("confirmation") or {}).get("confirmed", []) if n in by]


def question_units(tasks: Sequence[str], include_path) -> list[str]:
    """The named question tasks (perplexity tasks such as wikitext are corpora, not questions)."""
    from flipcheck.evaluation.runner import _rolling_units

    if not tasks:
        return []
    units = resolve_tasks(list(tasks), include_path)
    rolling = _rolling_units({u: task_tree(u, include_path) for u in units}, include_path)
    return [u for u in units if u not in rolling]


def prepare(sets: Sequence[Budgets], *, confirm: float | str | None, confirm_tasks: Sequence[str], tasks: Sequence[str],
            include_path, limit: float | None, seed: int, max_candidates: int
            ) -> tuple[list[Confirmation] | None, list[Budgets]]:
    """Before any model loads: the split (or the confirmation tasks), checked to be large enough to
    decide every set of budgets, and the budgets the search split is judged by (one per set). K of the
    Bonferroni rule is every candidate the search may verify: ``max_candidates`` per set of budgets.
    (None, sets) when nothing is confirmed (``confirm`` None and no tasks, or no question tasks)."""
    fraction = parse_confirm(confirm)  # checked even where --confirm-tasks replaces it
    units = question_units(tasks, include_path)
    if (fraction is None and not confirm_tasks) or not units:  # nothing to confirm on
        return None, list(sets)
    k = max_candidates * len(sets)
    c = sets[0].confidence
    c_s = search_confidence(c, k)
    split, conf_units = None, []
    if confirm_tasks:
        conf_units = question_units(confirm_tasks, include_path)
        sizes_c = {u: sum(n.values()) for u, n in question_counts(conf_units, include_path, limit).items()}
        sizes_s = {u: sum(n.values()) for u, n in question_counts(units, include_path, limit).items()}
    else:
        split = split_questions(question_counts(units, include_path, limit), fraction, seed)
        sizes_c, sizes_s = split.sizes("confirm"), split.sizes("search")
    for b in sets:
        values = {key: v for key, v in b.values.items() if v is not None}
        check_decidable(sizes_c, values, c, "confirmation")
        check_decidable(sizes_s, values, c_s, "search")
    confs = [Confirmation(b, c_s, k, split=split, tasks=conf_units) for b in sets]
    return confs, [b.at(c_s) for b in sets]
