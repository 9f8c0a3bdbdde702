"""Commands that decide what to compress: localize (which layers hurt) and search (the most compressed child within budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import (
    DEMO_TASKS,
    CpusPerChild,
    Executor,
    GpusPerChild,
    RayAddress,
    Verbose,
    console,
    err_console,
    executor_choice,
    progress_view,
    run_guarded,
    settings_options,
    setup_logging,
    verdict,
)
from flipcheck.decide.localize_report import localize_tables, write_localize
from flipcheck.decide.search_report import search_table, summary_lines
from flipcheck.evaluation.options import EVAL_ONLY, EvalOptions, ModelOptions
from flipcheck.runlog import third_party_output


@settings_options(ModelOptions)
def localize_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder ('-' to read it from CHILD's flipcheck.json)")],
    child: Annotated[str, typer.Argument(help="child model whose layers map one-to-one onto the parent's (hub id or folder)")],
    text: Annotated[str | None, typer.Option("--text", help="calibration text: a .txt/.jsonl file or folder, hf:NAME[:CONFIG[:SPLIT]], prompts:TASKS (default: the parent's own, else the prompts of --tasks)")] = None,
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="without --text: the lm-eval tasks whose prompts (never answers) are the text")] = DEMO_TASKS,
    include_path: Annotated[str | None, typer.Option("--include-path", help="folder of local lm-eval task YAMLs")] = None,
    windows: Annotated[int, typer.Option(min=1, help="text windows scored")] = 8,
    ctx: Annotated[int, typer.Option(min=8, help="tokens per window")] = 256,
    seed: Annotated[int, typer.Option(min=0, help="seed for cutting the windows")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass")] = 4,
    top: Annotated[int, typer.Option(min=1, help="layers and modules shown in the terminal")] = 10,
    out: Annotated[Path | None, typer.Option(help="run folder: report.json (a 'localize' block) and report.md")] = None,
    options: ModelOptions | None = None,
    verbose: Verbose = False,
) -> None:
    """Rank the child's decoder layers and Linear modules by their share of the damage: output error
    on the same inputs (relative error, cosine, SQNR), residual-stream error, and the text KL of the
    child's layer swapped into the parent and of the parent's layer restored in the child."""
    setup_logging(verbose)
    from flipcheck.decide.localize import localize

    def go():
        with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
            block = localize(parent, child, text=text, tasks=[t for t in tasks.split(",") if t], include_path=include_path,
                             windows=windows, ctx=ctx, seed=seed, batch_size=batch_size, **(options or ModelOptions()).model_dump(),
                             progress=lambda m: err_console.print(f"[dim]{m}[/]"))
        for table in localize_tables(block, top=top):
            console.print(table)
        if out is not None:
            write_localize(out, block)
            console.print(f"report: {Path(out) / 'report.md'}  (also report.json, localize.png)")

    run_guarded(go)


@settings_options(EvalOptions, exclude=EVAL_ONLY)
def search_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder")],
    method: Annotated[str, typer.Option("--method", "-m", help="rtn, gptq (a scheme per layer), wanda, sparsegpt (a sparsity per layer) or layer_drop (which layers to drop)")],
    out: Annotated[Path, typer.Option(help="folder for report.json/md/html, recipe.yaml (the winner), candidates/ and the resumable search-state.json")],
    choices: Annotated[str | None, typer.Option(help="per-layer options: scheme=W4A16,W8A16[,none] (rtn, gptq) or sparsity=0.3,0.5[,0] (wanda, sparsegpt); none for layer_drop")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="fixed key=value settings of every candidate, e.g. group_size=64")] = None,
    max_flips: Annotated[str | None, typer.Option(help="largest allowed flip rate, e.g. 2%; a list (2%,5%,10%, as for every budget) gives one confirmed recipe per budget from one sensitivity pass")] = None,
    max_kl: Annotated[str | None, typer.Option(help="largest allowed mean KL over options, e.g. 0.02")] = None,
    max_kl_text: Annotated[str | None, typer.Option(help="largest allowed mean KL(P‖C) per token on each --text corpus")] = None,
    max_ppl_ratio: Annotated[str | None, typer.Option(help="largest allowed PPL_child / PPL_parent on each --text corpus")] = None,
    min_acc_delta: Annotated[str | None, typer.Option(help="smallest allowed accuracy change, e.g. -1%")] = None,
    min_acc: Annotated[str | None, typer.Option(help="smallest allowed child accuracy, e.g. 60%")] = None,
    confidence: Annotated[str | None, typer.Option(help="judge flips by their one-sided Clopper-Pearson upper bound and Δacc by its lower bound at this level, e.g. 0.95")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="comma-separated lm-eval task names (default: none with --text, else the demo tasks)")] = None,
    calibration: Annotated[str | None, typer.Option(help="calibration source of the compressors and the sensitivity probe (default: the parent's own, else wikitext-2 train)")] = None,
    calibration_samples: int = 32,
    calibration_len: int = 256,
    probe_windows: Annotated[int, typer.Option(min=1, help="text windows the per-layer sensitivities are measured on")] = 8,
    probe_ctx: Annotated[int, typer.Option(min=8, help="tokens per sensitivity window")] = 256,
    max_candidates: Annotated[int, typer.Option(min=1, help="most children verified (uniform ones included)")] = 8,
    per_round: Annotated[int | None, typer.Option(min=1, help="proposals verified at once (default 1 local, 2 on Ray)")] = None,
    confirm: Annotated[str, typer.Option(help="share of each task's questions held out to confirm the winner (seeded, stratified by task and subtask), in (0, 1)")] = "0.3",
    confirm_tasks: Annotated[str | None, typer.Option("--confirm-tasks", help="comma-separated tasks to confirm the winner on instead (the search then uses all of --tasks)")] = None,
    no_confirm: Annotated[bool, typer.Option("--no-confirm", help="no confirmation: search and judge on all the questions (the winner may not hold on fresh ones)")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="result cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    options: EvalOptions | None = None,
    verbose: Verbose = False,
) -> None:
    """The most compressed child (per-layer choices) whose verified distance meets every budget: per-layer
    sensitivities on text, knapsack proposals, each one compressed and evaluated for real. Exit 0 with a
    winner (OUT/recipe.yaml), 1 when no candidate meets the budgets."""
    setup_logging(verbose)
    from flipcheck.compressors.registry import parse_set_options
    from flipcheck.decide.search import search

    o = options or EvalOptions()

    def go():
        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, 1)
        chosen = tasks.split(",") if tasks else ([] if o.texts else DEMO_TASKS.split(","))
        steps = max_candidates + 3  # the children verified at most, plus sensitivities and confirmations (an upper bound)
        with third_party_output(out, verbose=verbose), progress_view(steps, tasks=bool(chosen), texts=bool(o.texts), compress=True,
                                                                 title="flipcheck search") as bar:
            block = search(
                parent, method, choices, out=out, settings=parse_set_options(set_),
                budgets={"max_flips": max_flips, "max_kl": max_kl, "max_kl_text": max_kl_text, "max_ppl_ratio": max_ppl_ratio,
                         "min_acc_delta": min_acc_delta, "min_acc": min_acc},
                confidence=confidence, options=o, tasks=chosen,
                calibration={"source": calibration, "samples": calibration_samples, "seq_len": calibration_len},
                probe_windows=probe_windows, probe_ctx=probe_ctx, max_candidates=max_candidates, per_round=per_round,
                confirm=None if no_confirm else confirm, confirm_tasks=confirm_tasks.split(",") if confirm_tasks else (),
                cache_dir=cache_dir, executor=ex,
                progress=lambda m: err_console.print(m, style="dim", markup=False, highlight=False), on_step=bar.step)
        _show_search(block, out)

    run_guarded(go)


def _show_search(block: dict, out: Path) -> None:
    """The search's table, verdict lines and report folder; exit 0 with a winner, 1 without."""
    console.print(search_table(block))
    for line in summary_lines(block):
        verdict(line)
    console.print(f"report: {Path(out) / 'report.html'}  (also report.md, report.json"
                  + (", recipe.yaml)" if block.get("winner") else ")"))
    raise typer.Exit(0 if block.get("winner") else 1)
