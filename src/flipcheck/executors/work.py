"""The worker side of the Ray executor: a unit of work from plain settings and paths.

A job is a dict of JSON-like values (a recipe dump, a child spec dump, evaluation settings, the
cache and run folders), never a model. The worker builds its own tokenizer and evaluator, finds
the parent's results in the shared cache (it never scores the parent: a missing entry means it
cannot see the cache the driver wrote) and writes its own results there.

Kinds of job:

- ``child``: compress one recipe child into ``OUT/children/NAME`` and evaluate it (entry, rows);
- ``compress``: only compress (its evaluation shards follow as ``shard`` jobs);
- ``shard``: score one child on a list of units into the cache (the driver merges).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)

PROBE = ".flipcheck-run"  # written by the driver into --out: a worker that cannot see it has another disk


def run_job(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process (a Ray worker); returns plain values, with ``timings`` (seconds
    of each phase: imports on a fresh worker, set-up with lm-eval's task indexing, reading the
    parent from the cache, the work itself)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    import lm_eval  # noqa: F401  (a fresh worker pays these imports once; a reused one nothing)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    timings["imports"] = time.perf_counter() - t
    _setup_worker(job)
    _check_run_folder(job)
    if kind not in ("child", "compress", "shard"):
        raise FlipcheckError(f"unknown job kind {kind!r}")
    out = _recipe_child(job, timings, evaluate=kind == "child") if kind != "shard" else _shard(job, timings)
    out["timings"] = timings
    return out


class _Clock:
    def __init__(self, timings: dict[str, float]):
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


def _setup_worker(job: dict[str, Any]) -> None:
    """Torch threads = the CPUs Ray gave this task; the cache root the driver uses."""
    import torch

    threads = int(job.get("threads") or 1)
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.get("cache_dir"):
        os.environ["FLIPCHECK_CACHE"] = str(job["cache_dir"])


def _check_run_folder(job: dict[str, Any]) -> None:
    out = job.get("out")
    if out and not (Path(out) / PROBE).is_file():
        raise FlipcheckError(
            f"this Ray worker cannot see the run folder {out} (no {PROBE} there): --out must be on a path "
            "every node of the cluster can read and write (a shared file system)"
        )


def _check_parent_cached(evaluator, cache_dir: str | None) -> None:
    missing = evaluator.missing_parent_units()
    if missing:
        where = cache_dir or "the default cache (~/.cache/flipcheck)"
        raise FlipcheckError(
            f"this Ray worker cannot see the parent's results in the cache {where} (missing: {', '.join(missing)}): "
            "--cache-dir / FLIPCHECK_CACHE must be on a path every node of the cluster can read"
        )


def _recipe_child(job: dict[str, Any], timings: dict[str, float], *, evaluate: bool) -> dict[str, Any]:
    from flipcheck.recipes.runner import RecipeRun
    from flipcheck.recipes.schema import ChildSpec, Recipe

    clock = _Clock(timings)
    recipe = Recipe.model_validate(job["recipe"])
    spec = ChildSpec.model_validate(job["child"])
    run = RecipeRun(recipe, cache_dir=job["cache_dir"], say=lambda msg: log.info("%s", msg))
    clock.lap("setup")
    _check_parent_cached(run.evaluator, job["cache_dir"])
    clock.lap("parent_cache")
    done = run.child(int(job["index"]), spec, Path(job["out"]), evaluate=evaluate)
    clock.lap("work")
    if not evaluate:
        return {"folder": str(done.source), "info": done.info, "parent_passes": run.evaluator.parent_passes}
    entry, rows = done
    return {"entry": entry, "rows": rows, "parent_passes": run.evaluator.parent_passes}


def _shard(job: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    from flipcheck.evaluation.cache import ResultCache
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef

    clock = _Clock(timings)
    settings = EvalSettings(**job["settings"])
    evaluator = Evaluator(ModelRef("parent", job["parent"], engine=settings.engine_of("parent")), settings,
                          ResultCache(job["cache_dir"]))
    clock.lap("setup")
    _check_parent_cached(evaluator, job["cache_dir"])
    clock.lap("parent_cache")
    evaluator.score_child(ModelRef(job["name"], job["child"], engine=settings.engine_of("child")))
    clock.lap("work")
    return {"units": list(settings.tasks), "parent_passes": evaluator.parent_passes}
