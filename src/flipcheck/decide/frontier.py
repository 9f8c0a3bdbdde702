"""One sensitivity pass, several budgets: the frontier of confirmed recipes.

    flipcheck search PARENT --method rtn --choices scheme=W4A16,W8A16 --max-flips 2%,5%,10% ...

Budgets given as lists (:meth:`~flipcheck.decide.budgets.Budgets.parse_frontier`) are sets judged one
after the other by the same :class:`~flipcheck.decide.search_loop.Search`:

1. the parent is scored, the uniform children verified and the sensitivities measured **once**;
2. for each set of budgets in the order given, every candidate verified so far is judged anew by it
   and the search proposes and verifies until ``max_candidates`` more children are verified in all
   (set i stops at i · max_candidates), so a later set starts from everything earlier ones verified;
3. then every set judges every candidate (one verified for a later set may be the best for an earlier
   one), takes its smallest passing candidate on the search split and confirms it as a single search
   does (:mod:`.confirm`).

The report's top level is the first set's (its winner is OUT/recipe.yaml); ``frontier`` lists every
set with its winner, size and confirmation, and each set's recipe is OUT/frontier/recipe-I.yaml.
search.png draws every set's budget line and its winner.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flipcheck.decide.search_report import winner_recipe
from flipcheck.files import write_text_atomic

log = logging.getLogger(__name__)


def run_frontier(search, sets: Sequence, confs: Sequence | None, say: Callable[[str], None]) -> dict[str, Any]:
    """The module docstring's three steps; the first set's block with ``frontier`` added."""
    from flipcheck.decide.additivity import additivity
    from flipcheck.decide.confirm import confirm

    t0 = time.perf_counter()
    search.setup()
    for i, budgets in enumerate(sets):
        say(f"frontier: budgets {_text(budgets.values)} ({i + 1} of {len(sets)})")
        search.rejudge(budgets)
        search.explore(search.max_candidates * (i + 1))
    blocks = []
    for i, budgets in enumerate(sets):
        search.rejudge(budgets)
        block = search.summary(time.perf_counter() - t0)
        block["additivity"] = additivity(block["candidates"])
        if confs:
            confirm(search, block, confs[i], say)
        blocks.append(block)
    top = copy.deepcopy(blocks[0])
    top["frontier"] = [_entry(b, i) for i, b in enumerate(blocks)]
    top["cost"]["wall_s"] = round(time.perf_counter() - t0, 3)
    top["_frontier_blocks"] = blocks  # for their recipes; not written to report.json
    return top


def _text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if v is not None)


def _entry(block: Mapping[str, Any], i: int) -> dict[str, Any]:
    by = {c["name"]: c for c in block["candidates"]}
    w = by.get(block.get("winner") or "")
    return {"budgets": block["budgets"], "figure_budget": block.get("figure_budget"), "winner": block.get("winner"),
            "search_winner": block.get("search_winner", block.get("winner")),
            "winner_size_bits": w["size_bits"] if w else None, "winner_bits_per_weight": w["bits_per_weight"] if w else None,
            "winner_figure": w["figure"] if w else None,
            "winner_confirmation": (w.get("confirmation") if w else None),
            "confirmed": (block.get("confirmation") or {}).get("confirmed", []),
            "passed": [c["name"] for c in block["candidates"] if c["passed"]],
            "recipe": f"frontier/recipe-{i + 1}.yaml" if w else None}


def write_frontier(out: str | Path, block: dict[str, Any]) -> None:
    """OUT/frontier/recipe-I.yaml: each set's winner as a runnable recipe with that set's gate."""
    blocks = block.pop("_frontier_blocks", None)
    if not blocks:
        return
    folder = Path(out) / "frontier"
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(blocks):
        b = {**b, "recipe": block["recipe"], "confidence": block.get("confidence")}
        text = winner_recipe(b)
        path = folder / f"recipe-{i + 1}.yaml"
        if text is not None:
            write_text_atomic(path, text)
        elif path.exists():
            path.unlink()
