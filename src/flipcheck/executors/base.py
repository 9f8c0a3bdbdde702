"""The executor interface: where a run's children are made and scored.

An executor takes the children of a multi-child ``eval`` (:meth:`Executor.evaluate_children`) or of
a recipe (:meth:`Executor.recipe_children`), with the parent already in (or headed for) the
result cache, and returns an :class:`Outcome`: the report entries and per-question rows of the
children that finished, the ones that failed, and how it ran. ``local`` runs them one after the
other in this process; ``ray`` (:mod:`.ray_exec`) as tasks on a cluster. The orchestration code
(:func:`flipcheck.evaluation.runner.evaluate`, :func:`flipcheck.recipes.runner.run_recipe`) holds
an executor and does not know which one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Say = Callable[[str], None]


@dataclass
class Outcome:
    entries: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Executor(ABC):
    name = "?"

    def open(self, out: Path | None, cache, say: Say) -> None:  # noqa: B027 - optional preflight
        """Before any work: whatever can fail cheaply (a cluster to reach, folders to check)."""

    @abstractmethod
    def evaluate_children(self, ev, refs: list, out: Path | None, say: Say) -> Outcome:
        """Score every child (a :class:`~flipcheck.evaluation.runner.ModelRef`) against `ev`'s parent."""

    @abstractmethod
    def recipe_children(self, run, out: Path, say: Say, judge=None) -> Outcome:
        """Make and score every child of a :class:`~flipcheck.recipes.runner.RecipeRun` (parent scored)."""


class LocalExecutor(Executor):
    """One child after the other, here; finished children are kept as they finish."""

    name = "local"

    def _each(self, ev, jobs: list[tuple[str, Callable[[], tuple[dict, list[dict]]]]],
              done: Callable[[dict, list[dict], Outcome], None] | None = None) -> Outcome:
        """The one local loop: run each job, collect its entry and rows, let `done` keep what finished."""
        outcome = Outcome()
        for _name, job in jobs:
            entry, rows = job()
            outcome.entries.append(entry)
            outcome.rows.extend(rows)
            if done is not None:
                done(entry, rows, outcome)
        outcome.info = {"name": self.name, "parent_passes": ev.parent_passes}
        return outcome

    def evaluate_children(self, ev, refs: list, out: Path | None, say: Say) -> Outcome:
        def job(ref):
            try:
                return ev.evaluate_child(ref)
            finally:
                ref.release()

        return self._each(ev, [(ref.name, lambda ref=ref: job(ref)) for ref in refs])

    def recipe_children(self, run, out: Path, say: Say, judge=None) -> Outcome:
        from flipcheck.evaluation.report import write_report
        from flipcheck.recipes.runner import slug

        ev = run.evaluator

        def done(entry: dict, rows: list[dict], outcome: Outcome) -> None:
            if judge is not None:
                if ev.on_step is not None:
                    ev.on_step(f"{entry['name']}: judge")
                entry["judge"] = judge.judge_child(entry["name"], str(out / "children" / slug(entry["name"])))
            write_report(out, ev.report(outcome.entries), outcome.rows)  # keep what is finished

        jobs = [(spec.name, lambda i=i, spec=spec: run.child(i, spec, out)) for i, spec in enumerate(run.children, 1)]
        return self._each(ev, jobs, done)


class RayExecutor(Executor):
    """Each child (or each evaluation shard of it) as a Ray task (:mod:`.ray_exec`)."""

    name = "ray"

    def __init__(self, options) -> None:
        self.options = options
        self.session = None

    def open(self, out: Path | None, cache, say: Say) -> None:
        from flipcheck.executors.ray_exec import open_session

        self.session = open_session(self.options, out, cache, say)

    def evaluate_children(self, ev, refs: list, out: Path | None, say: Say) -> Outcome:
        from flipcheck.executors.ray_exec import evaluate_children

        entries, rows, failed, info = evaluate_children(ev, refs, out, self.options)
        return Outcome(entries, rows, failed, info)

    def recipe_children(self, run, out: Path, say: Say, judge=None) -> Outcome:
        from flipcheck.executors.ray_exec import run_recipe_children
        from flipcheck.recipes.runner import slug

        if self.session is None:
            self.open(out, run.cache, say)
        entries, rows, failed, info = run_recipe_children(run, out, self.session, say)
        for entry in entries if judge is not None else ():  # the judge runs here, after the workers
            entry["judge"] = judge.judge_child(entry["name"], str(out / "children" / slug(entry["name"])))
        return Outcome(entries, rows, failed, info)


def get_executor(options=None) -> Executor:
    """The executor for :class:`~flipcheck.executors.ExecutorOptions` (None: local)."""
    if options is None or options.name == "local":
        return LocalExecutor()
    if options.name == "ray":
        return RayExecutor(options)
    from flipcheck.errors import FlipcheckError

    raise FlipcheckError(f"--executor {options.name!r}: allowed are local, ray")
