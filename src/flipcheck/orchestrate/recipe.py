"""``flipcheck run`` and ``flipcheck sweep`` as functions: a recipe's children compressed and
evaluated by an executor (:mod:`.children`), judged where the recipe asks, the report written."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.options import EvalOptions
from flipcheck.evaluation.report import write_report
from flipcheck.executors import finish_report, get_executor
from flipcheck.judge.run import finish_report as finish_judged
from flipcheck.judge.run import recipe_session
from flipcheck.orchestrate.children import recipe_children
from flipcheck.recipes.checks import check_recipe
from flipcheck.recipes.runner import Progress, RecipeRun, _first_error
from flipcheck.recipes.schema import EvaluationSpec, Recipe, SweepSpec

log = logging.getLogger(__name__)


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
    executor: Any = None,
    on_step: Any = None,
) -> dict:
    """Compress and evaluate every child of `recipe`; write the report to `out`; return it.
    `on_step`: a progress hook called with "CHILD: compress/tasks/texts/judge" as each step starts.

    `executor`: None (or a local :class:`~flipcheck.executors.ExecutorOptions`) runs the children one
    after the other here; ``ExecutorOptions(name="ray", ...)`` runs each child as a Ray task.
    """
    out = Path(out)
    say = progress or (lambda msg: log.info("%s", msg))
    run = RecipeRun(recipe, cache_dir=cache_dir, use_cache=use_cache, say=say)
    check_recipe(run.recipe, run.parent_src)  # every child's static checks, before the parent is scored
    say(f"parent: {run.parent_src.spec}")
    evaluator = run.evaluator
    evaluator.on_step = on_step
    judge = recipe_session(recipe, cache_dir=cache_dir, use_cache=use_cache, progress=say)  # preflight: before any work
    runner = get_executor(executor)
    runner.open(out, Path(run.cache.root) if run.cache.enabled else None, say)  # folders checked, cluster reached
    evaluator.score_parent()  # before any child exists, so parent and child are never in memory together
    if judge is not None:
        judge.answer_parent(run.parent_src, tokenizer=run.tokenizer)  # once, cached; before any child exists
    done = recipe_children(runner, run, out, say, judge)
    spec = recipe.evaluation
    floor = evaluator.noise_floor(numerics=spec.noise_floor) if spec.noise_floor or spec.engine_floor else None
    report = finish_report(evaluator.report(done.entries, floor), done.failed, done.info)
    report["recipe"] = run.recipe.model_dump(mode="json", exclude_none=True)
    finish_judged(judge, report, out)
    write_report(out, report, done.rows)
    return report


def sweep(
    parent: str,
    method: str,
    grid: dict[str, list[Any]],
    *,
    tasks: list[str] | str = "flipcheck_demo_facts,flipcheck_demo_letters",
    out: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    options: EvalOptions | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    executor: Any = None,
    on_step: Any = None,
    **chosen: Any,
) -> dict:
    """Sweep one method's strength: ``sweep("demo", "wanda", {"sparsity": [0.1, 0.3, 0.5]}, out=...)``.
    `settings`: the method's fixed settings at every point; how the children are scored is `options`
    (:class:`~flipcheck.evaluation.options.EvalOptions`) or its fields by name, as for ``evaluate``."""
    task_list = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    opts = EvalOptions.merged(options, chosen)
    try:
        recipe = Recipe(
            name=f"sweep-{method}",
            parent=parent,
            calibration=calibration or {},
            sweeps=[SweepSpec(method=method, grid=grid, settings=settings or {})],
            evaluation=EvaluationSpec(tasks=task_list, **opts.score()),
            **opts.loading(),
        )
    except Exception as err:  # pydantic's ValidationError wraps our FlipcheckError text
        raise FlipcheckError(f"sweep {method}: {_first_error(err)}") from err
    return run_recipe(recipe, out, cache_dir=cache_dir, progress=progress, executor=executor, on_step=on_step)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['sparsity=0.1,0.2', 'mask=2:4'] -> {'sparsity': ['0.1', '0.2'], 'mask': ['2:4']}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise FlipcheckError(f"--grid {item!r}: expected key=v1,v2,... (e.g. sparsity=0.1,0.2,0.3)")
        k, v = item.split("=", 1)
        values = [x.strip() for x in v.split(",") if x.strip()]
        if not values:
            raise FlipcheckError(f"--grid {item!r}: no values")
        grid[k.strip()] = values
    return grid
