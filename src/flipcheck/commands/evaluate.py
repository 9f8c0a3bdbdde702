"""Commands that score a parent against its children: eval (and eval --until-decided), compare, run, sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import (
    DEMO_TASKS,
    CpusPerChild,
    Executor,
    Filter,
    GpusPerChild,
    Metric,
    RayAddress,
    Shards,
    Verbose,
    console,
    err_console,
    executor_choice,
    exit_if_failed,
    log,
    progress_view,
    run_guarded,
    served_pairs,
    settings_options,
    setup_logging,
    show_report,
    verdict,
)
from flipcheck.decide.until_decided import check_options, lines, until_decided, write
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.options import EvalOptions
from flipcheck.gate import run_gate
from flipcheck.runlog import third_party_output


@settings_options(EvalOptions)
def eval_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder ('-' to read it from CHILD's flipcheck.json)")],
    children: Annotated[list[str] | None, typer.Argument(help="one or more child models (hub ids, folders, .gguf files)")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="comma-separated lm-eval task names; perplexity tasks (wikitext) are scored as text corpora (default: the demo tasks, none with --text)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.json, samples.jsonl, report.md, report.html")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="parent cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not read or write cached results")] = False,
    child_url: Annotated[list[str] | None, typer.Option("--child-url", help="a child already served behind an OpenAI-compatible /v1/completions (vLLM: python -m vllm.entrypoints.openai.api_server); API key from $FLIPCHECK_API_KEY or $OPENAI_API_KEY")] = None,
    child_model: Annotated[list[str] | None, typer.Option("--child-model", help="the served child's model name, one per --child-url")] = None,
    parent_url: Annotated[str | None, typer.Option("--parent-url", help="score the parent through this OpenAI-compatible server instead of loading it (PARENT then gives the tokenizer)")] = None,
    parent_model: Annotated[str | None, typer.Option("--parent-model", help="the served parent's model name")] = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    shards: Shards = 1,
    until_decided: Annotated[bool, typer.Option("--until-decided", help="score questions in seeded random batches and stop once an anytime-valid confidence sequence decides --max-flips at --confidence (one child)")] = False,
    max_flips: Annotated[str | None, typer.Option(help="with --until-decided: the flip budget, e.g. 2%")] = None,
    confidence: Annotated[str | None, typer.Option(help="with --until-decided: the confidence of its bounds, e.g. 0.95")] = None,
    batch_questions: Annotated[int, typer.Option(help="with --until-decided: questions per task per round")] = 100,
    options: EvalOptions | None = None,
    verbose: Verbose = False,
) -> None:
    """Score PARENT and CHILD on the same lm-eval instances and text corpora; report accuracy, flips and KL."""
    setup_logging(verbose)
    from flipcheck.orchestrate.evaluate import evaluate

    o = options or EvalOptions()

    def go():
        if until_decided:
            _until_decided_alone(o, child_url, parent_url, executor)
            return _until_decided(parent, children, tasks, out, max_flips, confidence, batch_questions, o,
                                  dict(cache_dir=cache_dir, use_cache=not no_cache))
        served, served_parent = _served_models(children, child_url, child_model, parent_url, parent_model)
        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        chosen = tasks if tasks is not None else ("" if o.texts else DEMO_TASKS)
        with progress_view(len(children or []) + len(served), tasks=bool(chosen), texts=bool(o.texts), title="flipcheck eval") as bar:
            report = evaluate(
                None if parent == "-" else parent, children or [], served=served, served_parent=served_parent,
                tasks=chosen, out=out, options=o, cache_dir=cache_dir, use_cache=not no_cache, executor=ex,
                on_step=bar.step,
            )
        show_report(report, out)
        exit_if_failed(report)


    with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
        run_guarded(go)


def _until_decided_alone(o: EvalOptions, child_url, parent_url, executor) -> None:
    """`eval --until-decided` scores question tasks round by round: refuse the options it cannot honour."""
    if o.texts or o.noise_floor or o.engine_floor or child_url or parent_url or executor != "local":
        raise FlipcheckError("--until-decided scores question tasks round by round, here: drop --text, "
                             "--noise-floor, --engine-floor, --child-url/--parent-url and --executor ray")


def _served_models(children, child_url, child_model, parent_url, parent_model):
    """(served children, served parent or None) from --child-url/--child-model and --parent-url/--parent-model;
    refuses a command with neither a CHILD nor a served child."""
    served = served_pairs(child_url, child_model)
    served_parent = served_pairs([parent_url] if parent_url else [], [parent_model] if parent_model else [])
    if not children and not served:
        raise FlipcheckError("give at least one CHILD, or a served child with --child-url URL --child-model NAME")
    return served, served_parent[0] if served_parent else None


def _until_decided(parent, children, tasks, out, max_flips, confidence, batch, o: EvalOptions, options) -> None:
    """`eval --until-decided`: the sequential gate (flipcheck.decide.until_decided); exit 0 PASS, 1 FAIL."""
    check_options(max_flips, confidence, batch)
    if len(children or []) != 1 or parent == "-":
        raise FlipcheckError("--until-decided judges one CHILD against a named PARENT")
    named = {"seed", "include_path", "limit", "metric"}  # until_decided's own parameters; the rest reach EvalSettings
    block = until_decided(parent, children[0], tasks=(tasks or DEMO_TASKS).split(","), max_flips=max_flips,
                          confidence=confidence, batch=batch, seed=o.seed, include_path=o.include_path, limit=o.limit,
                          metric=o.metric, say=lambda m: err_console.print(m, style="dim", markup=False, highlight=False),
                          **{k: v for k, v in o.model_dump().items() if k not in named}, **options)
    for line in lines(block):
        verdict(line)
    if out is not None:
        console.print(f"report: {write(out, block)}")
    raise typer.Exit(0 if block["verdict"] == "pass" else 1)


def compare_cmd(
    parent_samples: Annotated[Path, typer.Argument(help="lm-eval --log_samples file of the parent (samples_TASK_*.jsonl)")],
    child_samples: Annotated[Path, typer.Argument(help="the child's file for the same task")],
    task: Annotated[str | None, typer.Option(help="task name (default: from the file name)")] = None,
    out: Annotated[Path | None, typer.Option(help="write report.json etc. here")] = None,
    metric: Metric = None,
    filter_: Filter = None,
    verbose: Verbose = False,
) -> None:
    """Flips, answer changes, KL over options and margins from two existing lm-eval sample files."""
    setup_logging(verbose)
    from flipcheck.evaluation.compare import compare

    def go():
        report = compare(parent_samples, child_samples, task=task, out=out, metric=metric, filter_name=filter_)
        show_report(report, out)

    run_guarded(go)


@settings_options(EvalOptions, overrides=True)
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file, or the name of a bundled recipe (flipcheck list)")],
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/RECIPE-NAME)")] = None,
    parent: Annotated[str | None, typer.Option(help="override the recipe's parent (hub id or folder)")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="override the recipe's tasks (comma-separated)")] = None,
    calibration: Annotated[str | None, typer.Option(help="override the calibration source")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="result cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    shards: Shards = 1,
    options: dict | None = None,
    verbose: Verbose = False,
) -> None:
    """Compress, evaluate every child against the parent, write the report, apply the recipe's gate.
    Every evaluation option given overrides the recipe's."""
    setup_logging(verbose)
    from flipcheck.orchestrate.recipe import run_recipe
    from flipcheck.recipes.schema import load_recipe, with_overrides

    def go():
        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        r = with_overrides(load_recipe(recipe), {**(options or {}), **({"tasks": tasks.split(",")} if tasks else {})},
                           parent=parent, calibration=calibration)
        folder = out or Path("runs") / r.name

        ev = r.evaluation
        with third_party_output(folder, verbose=verbose), progress_view(
                len(r.all_children()), tasks=bool(ev.tasks), texts=bool(ev.texts), compress=True,
                judge=r.judge is not None, title=f"flipcheck run {r.name}") as bar:
            report = run_recipe(r, folder, cache_dir=cache_dir, progress=lambda m: log.info("%s", m),
                                executor=ex, on_step=bar.step)
        show_report(report, folder)
        if r.gate is not None:
            ok = run_gate(folder / "report.json", **r.gate.budgets(), echo=verdict)
            exit_if_failed(report)
            raise typer.Exit(0 if ok else 1)
        exit_if_failed(report)

    run_guarded(go)


@settings_options(EvalOptions)
def sweep_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id, folder, or 'demo'")],
    method: Annotated[str, typer.Option("--method", "-m", help="method to sweep")],
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="key=v1,v2,... (repeat for a product grid)")],
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="comma-separated lm-eval task names (default: the demo tasks, none with --text)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/sweep-METHOD)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="fixed key=value settings for every point")] = None,
    calibration: Annotated[str | None, typer.Option(help="calibration source (default: the parent's own, else wikitext-2 train)")] = None,
    calibration_samples: int = 32,
    calibration_len: int = 256,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    shards: Shards = 1,
    options: EvalOptions | None = None,
    verbose: Verbose = False,
) -> None:
    """Evaluate one method at several strengths against one parent (evaluated once)."""
    setup_logging(verbose)
    from flipcheck.compressors.registry import parse_set_options
    from flipcheck.orchestrate.recipe import parse_grid, sweep

    o = options or EvalOptions()

    def go():
        import math


        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        folder = out or Path("runs") / f"sweep-{method}"
        points = parse_grid(grid)
        chosen = tasks if tasks is not None else ([] if o.texts else DEMO_TASKS)
        with third_party_output(folder, verbose=verbose), progress_view(
                math.prod(len(v) for v in points.values()), tasks=bool(chosen), texts=bool(o.texts), compress=True,
                title=f"flipcheck sweep {method}") as bar:
            report = sweep(
                parent, method, points, tasks=chosen, out=folder, settings=parse_set_options(set_),
                calibration={"source": calibration, "samples": calibration_samples, "seq_len": calibration_len},
                options=o, cache_dir=cache_dir, progress=lambda m: log.info("%s", m), executor=ex, on_step=bar.step,
            )
        show_report(report, folder)
        exit_if_failed(report)

    run_guarded(go)
