"""The `flipcheck` command: thin wrappers that parse options and call library functions.

Each command lives in :mod:`flipcheck.commands` (one module per group); this module is the typer
app and registers them, in the order `flipcheck --help` lists them."""

from __future__ import annotations

import typer

from flipcheck.commands import compress, decide, demo, evaluate, gate, judge

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress a language model and measure how far it drifts from its parent: flips, KL, margins.",
)

app.command("eval")(evaluate.eval_cmd)
app.command("compare")(evaluate.compare_cmd)
app.command("compress")(compress.compress_cmd)
app.command("list")(compress.list_cmd)
app.command("gate")(gate.gate_cmd)
app.command("run")(evaluate.run_cmd)
app.command("sweep")(evaluate.sweep_cmd)
app.command("judge")(judge.judge_cmd)
app.command("demo")(demo.demo_cmd)
app.command("plan")(gate.plan_cmd)
app.command("localize")(decide.localize_cmd)
app.command("search")(decide.search_cmd)


def main() -> None:  # pragma: no cover
    app()
