"""Children as work units: the plans an executor runs, and what the driver does as each finishes.

A multi-child ``eval`` scores each child against the evaluator's parent; a recipe's child is
compressed, then scored. Either becomes a :class:`~flipcheck.executors.ChildPlan`: how to do it
here, and the same as plain jobs (:mod:`flipcheck.orchestrate.work`) for an executor that runs
elsewhere, where the parent is scored here once first and read from the shared cache by every job.
With evaluation shards (``--shards``) a child's tasks are split into lists, each a job, and merged
here from the cache. The report is rewritten after every finished child, in the plans' order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flipcheck.evaluation.report import write_report
from flipcheck.evaluation.runner import Evaluator, ModelRef
from flipcheck.executors import ChildPlan, Executor, Outcome, finish_report
from flipcheck.executors.base import Say
from flipcheck.executors.shards import split_units
from flipcheck.orchestrate.work import COMPRESS_CHILD, RECIPE_CHILD, SHARD
from flipcheck.recipes.runner import RecipeRun, slug


def cache_root(ev: Evaluator) -> Path | None:
    return Path(ev.cache.root) if ev.cache.enabled else None


def _shards(runner: Executor) -> int:
    return getattr(getattr(runner, "options", None), "shards", 1)


def _shard_jobs(ev: Evaluator, parent: str, child: str, name: str, out: Path | None, groups: list[list[str]]):
    return [(SHARD, {"settings": {**ev.settings.model_dump(), "tasks": list(g)}, "parent": parent,
                     "child": child, "name": name, "cache_dir": str(ev.cache.root), "out": str(out) if out else None})
            for g in groups]


def eval_plans(runner: Executor, ev: Evaluator, refs: list[ModelRef], out: Path | None) -> list[ChildPlan]:
    """One plan per child of a multi-child eval (each child released after its evaluation)."""
    groups = split_units(list(ev.units), _shards(runner))
    plans = []
    for i, ref in enumerate(refs, 1):
        def here(ref=ref) -> tuple[dict, list[dict]]:
            try:
                return ev.evaluate_child(ref)
            finally:
                ref.release()

        jobs = _shard_jobs(ev, ev.parent.src().spec, ref.src().spec, ref.name, out, groups) if runner.remote else []
        plans.append(ChildPlan(i, ref.name, here, shard_jobs=lambda _r, jobs=jobs: jobs,
                               merge=lambda _r, here=here: here()))
    return plans


def recipe_plans(runner: Executor, run: RecipeRun, out: Path) -> list[ChildPlan]:
    """One plan per recipe child: compressed into ``OUT/children/NAME``, then evaluated."""
    ev = run.evaluator
    groups = split_units(list(ev.units), _shards(runner))
    recipe = run.recipe.model_copy(update={"parent": run.parent_src.spec})  # "demo" resolved: workers never train it
    base = {"recipe": recipe.model_dump(mode="json"), "cache_dir": str(run.cache.root), "out": str(out)}
    plans = []
    for i, spec in enumerate(run.children, 1):
        job = {**base, "child": spec.model_dump(mode="json"), "index": i}
        def here(i: int = i, spec=spec) -> tuple[dict, list[dict]]:
            return run.child(i, spec, out)

        if len(groups) == 1:
            plans.append(ChildPlan(i, spec.name, here, first=(RECIPE_CHILD, job)))
            continue

        def shard_jobs(result: dict | None, name: str = spec.name) -> list:
            return _shard_jobs(ev, run.parent_src.spec, result["folder"], name, out, groups)

        def merge(result: dict | None, name: str = spec.name) -> tuple[dict, list[dict]]:
            return ev.evaluate_child(ModelRef(name, result["folder"], info=result["info"],
                                              engine=ev.settings.engine_of("child")))

        plans.append(ChildPlan(i, spec.name, here, first=(COMPRESS_CHILD, job), shard_jobs=shard_jobs, merge=merge))
    return plans


def run_children(runner: Executor, ev: Evaluator, plans: list[ChildPlan], out: Path | None, say: Say, *,
                 judge: Any = None, keep: bool = True) -> Outcome:
    """Run `plans` on `runner` (the parent scored here first where the children run elsewhere); each
    finished child judged (with a judge session) and, with `keep`, the report rewritten in `out`
    after each."""
    if runner.remote:
        say("scoring the parent (once, here)")
        ev.score_parent()
    passes = ev.parent_passes

    def info(outcome: Outcome) -> dict[str, Any]:
        got = dict(outcome.info)
        got["parent_passes"] = passes + int((got.pop("counts", None) or {}).get("parent_passes", 0))
        return got

    def on_done(plan: ChildPlan, entry: dict, rows: list[dict]) -> None:
        if judge is not None:
            if ev.on_step is not None:
                ev.on_step(f"{entry['name']}: judge")
            entry["judge"] = judge.judge_child(entry["name"], str(out / "children" / slug(entry["name"])))

    def on_progress(outcome: Outcome) -> None:
        if keep and out is not None:  # keep what is finished
            write_report(out, finish_report(ev.report(outcome.entries), outcome.failed, info(outcome)), outcome.rows)

    outcome = runner.run(plans, say, on_done=on_done, on_progress=on_progress)
    outcome.info = info(outcome)
    if not runner.remote:
        outcome.info["parent_passes"] = ev.parent_passes
    return outcome


def evaluate_children(runner: Executor, ev: Evaluator, refs: list[ModelRef], out: Path | None, say: Say) -> Outcome:
    """Score every child against `ev`'s parent on `runner`."""
    runner.open(out, cache_root(ev), say)
    # here, eval writes its report once at the end; elsewhere each finished child is kept as it comes
    return run_children(runner, ev, eval_plans(runner, ev, refs, out), out, say, keep=runner.remote)


def recipe_children(runner: Executor, run: RecipeRun, out: Path, say: Say, judge: Any = None) -> Outcome:
    """Make and score every child of `run` (its parent scored) on `runner`."""
    runner.open(out, cache_root(run.evaluator), say)
    return run_children(runner, run.evaluator, recipe_plans(runner, run, out), out, say, judge=judge)
