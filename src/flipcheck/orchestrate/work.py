"""The jobs a remote executor runs (:func:`flipcheck.executors.work.run_job` imports them by name).

Each takes plain values (a recipe dump, a child spec dump, evaluation settings, the cache and run
folders) and its phase timings; the worker builds its own tokenizer and evaluator, finds the
parent's results in the shared cache (it never scores the parent: a missing entry means it cannot
see the cache the driver wrote) and writes its own results there.

- :func:`child`: compress one recipe child into ``OUT/children/NAME`` and evaluate it;
- :func:`compress`: only compress (its evaluation shards follow as :func:`shard` jobs);
- :func:`shard`: score one child on a list of units into the cache (the driver merges).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.executors.work import Clock

log = logging.getLogger(__name__)

RECIPE_CHILD = f"{__name__}:child"
COMPRESS_CHILD = f"{__name__}:compress"
SHARD = f"{__name__}:shard"


def _imports(timings: dict[str, float]) -> None:
    clock = Clock(timings)
    import lm_eval  # noqa: F401  (a fresh worker pays these imports once; a reused one nothing)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    clock.lap("imports")


def _check_parent_cached(evaluator, cache_dir: str | None) -> None:
    missing = evaluator.missing_parent_units()
    if missing:
        where = cache_dir or "the default cache (~/.cache/flipcheck)"
        raise FlipcheckError(
            f"this Ray worker cannot see the parent's results in the cache {where} (missing: {', '.join(missing)}): "
            "--cache-dir / FLIPCHECK_CACHE must be on a path every node of the cluster can read"
        )


def _recipe_run(job: dict[str, Any], timings: dict[str, float]):
    from flipcheck.recipes.runner import RecipeRun
    from flipcheck.recipes.schema import ChildSpec, Recipe

    _imports(timings)
    clock = Clock(timings)
    recipe = Recipe.model_validate(job["recipe"])
    spec = ChildSpec.model_validate(job["child"])
    run = RecipeRun(recipe, cache_dir=job["cache_dir"], say=lambda msg: log.info("%s", msg))
    clock.lap("setup")
    _check_parent_cached(run.evaluator, job["cache_dir"])
    clock.lap("parent_cache")
    return run, spec, clock


def child(job: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Compress and evaluate one recipe child: its report entry and rows."""
    run, spec, clock = _recipe_run(job, timings)
    entry, rows = run.child(int(job["index"]), spec, Path(job["out"]))
    clock.lap("work")
    return {"entry": entry, "rows": rows, "counts": {"parent_passes": run.evaluator.parent_passes}}


def compress(job: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Only compress one recipe child: its folder and report info (shards evaluate it)."""
    run, spec, clock = _recipe_run(job, timings)
    done = run.child(int(job["index"]), spec, Path(job["out"]), evaluate=False)
    clock.lap("work")
    return {"folder": str(done.source), "info": done.info, "counts": {"parent_passes": run.evaluator.parent_passes}}


def shard(job: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Score one child on the job's units into the shared cache."""
    from flipcheck.evaluation.cache import ResultCache
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef

    _imports(timings)
    clock = Clock(timings)
    settings = EvalSettings(**job["settings"])
    evaluator = Evaluator(ModelRef("parent", job["parent"], engine=settings.engine_of("parent")), settings,
                          ResultCache(job["cache_dir"]))
    clock.lap("setup")
    _check_parent_cached(evaluator, job["cache_dir"])
    clock.lap("parent_cache")
    evaluator.score_child(ModelRef(job["name"], job["child"], engine=settings.engine_of("child")))
    clock.lap("work")
    return {"units": list(settings.tasks), "counts": {"parent_passes": evaluator.parent_passes}}
