"""``flipcheck search`` as a function (:func:`search`): the options checked, the questions split, the run's
recipe built, then the loop of :mod:`.search_loop` (the algorithm is described there) and the steps of
:mod:`.search_steps` around it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flipcheck.compressors.calibration_data import evaluated_text_source
from flipcheck.decide.budgets import BUDGET_NAMES, Budgets  # noqa: F401 - re-exported
from flipcheck.decide.confirm import prepare
from flipcheck.decide.search_loop import STATE, Candidate, Say, Search, State, _task_figures, pareto  # noqa: F401 - re-exported
from flipcheck.decide.search_space import Space, parse_space
from flipcheck.decide.search_steps import check_counts, finish_search, open_run, run_search
from flipcheck.decide.splits import DEFAULT_CONFIRM, search_split_text
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.options import EVAL_ONLY, EvalOptions
from flipcheck.executors import get_executor
from flipcheck.recipes.runner import _first_error
from flipcheck.recipes.schema import CalibrationConfig, ChildSpec, EvaluationSpec, Recipe, StepSpec

log = logging.getLogger(__name__)


def default_text(parent: str, calibration: Mapping[str, Any] | None, tasks: Sequence[str],
                 include_path: str | None, texts: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """The calibration settings with a source that works offline when none is given
    (:func:`~flipcheck.compressors.calibration_data.evaluated_text_source`), and the report's note."""
    cal = dict(calibration or {})
    if cal.get("source"):
        return cal, None
    cal["source"], note = evaluated_text_source(parent, tasks, include_path, texts)
    return cal, note


def _recipe(parent: str, space: Space, calibration: Mapping[str, Any] | None, evaluation: Mapping[str, Any], **recipe_level):
    """The run's recipe: its evaluation section, and a placeholder child (layer_drop: drop layer 0 of 2)
    that the candidates replace; a setting pydantic refuses is one line naming it."""
    k = next(k for k, c in enumerate(space.choices) if not c.keep)
    keep = [i for i, c in enumerate(space.choices) if c.keep][:1]
    first = space.settings([k]) or space.settings([k, *keep])
    try:
        return Recipe(name="search", parent=parent, calibration=CalibrationConfig(**(calibration or {})),
                      children=[ChildSpec(name="search-placeholder", steps=[StepSpec(method=space.method, settings=first)])],
                      evaluation=EvaluationSpec(**evaluation), **recipe_level)
    except FlipcheckError:
        raise
    except Exception as err:  # pydantic's ValidationError wraps our FlipcheckError text
        raise FlipcheckError(f"search {space.method}: {_first_error(err)}") from err


def search_options(options: EvalOptions | None, chosen: Mapping[str, Any]) -> EvalOptions:
    """The candidates' scoring options; the floors and sampling, which search cannot honour, refused."""
    opts = EvalOptions.merged(options, dict(chosen))
    asked = [k for k, default in EVAL_ONLY.items() if getattr(opts, k) != default]
    if asked:
        raise FlipcheckError(f"search scores greedy answers of candidates: {', '.join(asked)} are eval's options, not search's")
    if isinstance(opts.include_path, list):  # its probe text names the task prompts by one folder
        raise FlipcheckError(f"search takes one --include-path folder, got {len(opts.include_path)}")
    return opts


def search(
    parent: str,
    method: str,
    choices: str | None,
    *,
    out: str | os.PathLike,
    settings: Mapping[str, Any] | None = None,
    budgets: Mapping[str, Any],
    confidence: str | float | None = None,
    options: EvalOptions | None = None,
    tasks: Sequence[str] = (),
    calibration: Mapping[str, Any] | None = None,
    probe_windows: int = 8,
    probe_ctx: int = 256,
    probe_batch_size: int = 4,
    max_candidates: int = 8,
    per_round: int | None = None,
    confirm: float | str | None = DEFAULT_CONFIRM,
    confirm_tasks: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
    executor: Any = None,
    progress: Say | None = None,
    on_step: Say | None = None,
    **chosen: Any,
) -> dict[str, Any]:
    """Search, write DIR/report.json (+ md, html, recipe.yaml) and return the search block.

    Candidates are scored as `options` (:class:`~flipcheck.evaluation.options.EvalOptions`) or its
    fields by name say, as for ``evaluate``; the floors and sampling are eval's alone (a floor row is
    no candidate, and the gate counts greedy answers).

    ``confirm`` (a share in (0, 1), None for no confirmation) or ``confirm_tasks``: the search proposes
    and verifies on the search split, at the tightened confidence, and the winner is the smallest
    candidate that also passes on the confirmation split (:mod:`.confirm`, :mod:`.splits`)."""
    say = progress or (lambda msg: log.info("%s", msg))
    opts = search_options(options, chosen)
    include_path, limit, seed, metric, texts = opts.include_path, opts.limit, opts.seed, opts.metric, opts.texts
    calibration, text_note = default_text(parent, calibration, tasks, include_path, texts)
    space = parse_space(method, choices, settings)
    sets = Budgets.parse_frontier(budgets, confidence, metric, texts)
    judged = sets[0]
    check_counts(max_candidates, per_round)
    confs, sets_search = prepare(sets, confirm=confirm, confirm_tasks=list(confirm_tasks), tasks=tasks,
                                 include_path=include_path, limit=limit, seed=seed, max_candidates=max_candidates)
    conf, judged_search = (confs[0] if confs else None), sets_search[0]
    calibration, text_note = search_split_text(calibration, text_note, conf and conf.split, include_path, out)
    evaluation = dict(opts.score(), tasks=list(tasks),
                      doc_ids=conf.split.search if conf is not None and conf.split is not None else None)
    recipe = _recipe(parent, space, calibration, evaluation, **opts.loading())
    out = Path(out)
    run = open_run(recipe, out, cache_dir, say)
    runner = get_executor(executor)
    probe = {"text": run.recipe.calibration.source, "windows": probe_windows, "ctx": probe_ctx, "seed": run.recipe.calibration.seed,
             "batch_size": probe_batch_size}
    rounds = per_round if per_round is not None else (1 if runner.name == "local" else 2)
    s = Search(space, judged_search, run, out, runner, probe=probe, max_candidates=max_candidates, per_round=rounds, say=say,
               on_step=on_step)
    block = run_search(s, sets, sets_search, confs, conf, say)
    finish_search(out, block, run, judged.confidence, judged_search.confidence, text_note)
    return block
