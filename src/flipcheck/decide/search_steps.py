"""The steps :func:`flipcheck.decide.search.search` takes around the :class:`~flipcheck.decide.search_loop.Search`
loop: check the counts, open the recipe run, run the search (one set of budgets or a frontier of
several, with the winner confirmed on held-out questions), and complete and write the search block.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flipcheck.decide.frontier import run_frontier, write_frontier
from flipcheck.decide.search_report import write_search
from flipcheck.errors import FlipcheckError

if TYPE_CHECKING:
    from flipcheck.decide.search_loop import Search

Say = Callable[[str], None]


def check_counts(max_candidates: int, per_round: int | None) -> None:
    if max_candidates < 1:
        raise FlipcheckError(f"--max-candidates {max_candidates}: must be >= 1")
    if per_round is not None and per_round < 1:
        raise FlipcheckError(f"--per-round {per_round}: must be >= 1")


def open_run(recipe, out: Path, cache_dir, say: Say):
    """The search's recipe run in `out` (created), its recipe and calibration source checked."""
    from flipcheck.compressors.calibration_data import check_reachable
    from flipcheck.recipes.checks import check_recipe
    from flipcheck.recipes.runner import RecipeRun

    out.mkdir(parents=True, exist_ok=True)
    run = RecipeRun(recipe, cache_dir=cache_dir, say=say)
    check_recipe(run.recipe, run.parent_src)
    check_reachable(run.recipe.calibration.source)  # the sensitivity probe reads it whatever the method needs
    return run


def run_search(s: Search, sets, sets_search, confs, conf, say: Say) -> dict[str, Any]:
    """Run the search: one frontier over several sets of budgets, else one search, its additivity
    and (with a confirmation split) the winner confirmed."""
    from flipcheck.decide.additivity import additivity
    from flipcheck.decide.confirm import confirm as run_confirmation

    if len(sets) > 1:  # one sensitivity pass, one confirmed winner per set of budgets
        return run_frontier(s, sets_search, confs, say)
    block = s.go()
    block["additivity"] = additivity(block["candidates"])
    if conf is not None:
        run_confirmation(s, block, conf, say)
    return block


def finish_search(out: Path, block: dict[str, Any], run, confidence, search_confidence, text_note) -> None:
    """Complete the block (probe note, confidences, the recipe searched) and write the report files."""
    if text_note:
        block["probe"] = {**block.get("probe", {}), "note": text_note}
    block["confidence"], block["search_confidence"] = confidence, search_confidence
    block["recipe"] = run.recipe.model_dump(mode="json", exclude_none=True)
    block["recipe"]["evaluation"].pop("doc_ids", None)  # the winner's recipe is judged on all the questions
    write_frontier(out, block)  # each set's recipe (takes the sets' blocks out of the report)
    write_search(out, block)
