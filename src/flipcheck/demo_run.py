"""`flipcheck demo`: the bundled demo recipe, run offline, with a summary that makes the point.

The demo parent is trained on first use (a few minutes on a laptop CPU) and cached; then several
methods at a few strengths each are compared with it on the two demo tasks, and the terminal says
which children kept their accuracy while changing many answers (Dutta et al. 2024).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

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
    from flipcheck.demo import demo_model_path
    from flipcheck.evaluation.report import render_table
    from flipcheck.recipes.runner import run_recipe

    console = console or Console()
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:
        job = bar.add_task("training the demo parent (first run only)", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(job, completed=step, total=total, description=f"training the demo parent, loss {loss:.3f}")

        parent = demo_model_path(retrain=retrain, progress=on_step)
    console.print(f"demo parent: {parent}  ({time.perf_counter() - t0:.0f}s)")
    recipe = demo_recipe(quick).model_copy(update={"parent": str(parent)})
    report = run_recipe(recipe, out, progress=lambda m: console.print(f"[dim]{m}[/]"))
    console.print(render_table(report, width=console.width))
    console.print("[bold]Accuracy vs answers changed (all questions):[/]")
    for line in hidden_change_lines(report):
        console.print("  " + line, highlight=False)
    console.print(
        f"report: {Path(out) / 'report.html'} (and report.md)   total {time.perf_counter() - t0:.0f}s", highlight=False
    )
    return report
