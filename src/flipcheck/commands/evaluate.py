"""Commands that score a parent against its children: eval (and eval --until-decided), compare, run, sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import (
    DEMO_TASKS,
    ChildEngine,
    CpusPerChild,
    Ctx,
    Device,
    Dtype,
    EngineFloor,
    EngineOpt,
    Executor,
    Filter,
    GpusPerChild,
    KlMethod,
    Metric,
    NoiseFloor,
    ParentEngine,
    PerSubtask,
    RayAddress,
    Sample,
    Samples,
    Scoring,
    Shards,
    Texts,
    TrustRemote,
    Verbose,
    console,
    engine_choices,
    err_console,
    executor_choice,
    exit_if_failed,
    kl_choice,
    log,
    metric_choice,
    progress_view,
    run_guarded,
    served_pairs,
    setup_logging,
    show_report,
    verdict,
)
from flipcheck.errors import FlipcheckError


def eval_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder ('-' to read it from CHILD's flipcheck.json)")],
    children: Annotated[list[str] | None, typer.Argument(help="one or more child models (hub ids, folders, .gguf files)")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="comma-separated lm-eval task names; perplexity tasks (wikitext) are scored as text corpora (default: the demo tasks, none with --text)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.json, samples.jsonl, report.md, report.html")] = None,
    include_path: Annotated[list[str] | None, typer.Option("--include-path", help="folder of local lm-eval task YAMLs")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="few-shot examples (task default if unset)")] = None,
    limit: Annotated[float | None, typer.Option(help="questions per task (count, or fraction if < 1)")] = None,
    batch_size: Annotated[str, typer.Option(help="sequences per forward, or auto: the largest that fits the device (16 on CPU)")] = "16",
    seed: int = 1234,
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    cache_dir: Annotated[Path | None, typer.Option(help="parent cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not read or write cached results")] = False,
    noise_floor: NoiseFloor = False,
    metric: Metric = None,
    filter_: Filter = None,
    per_subtask: PerSubtask = False,
    kl: KlMethod = "topk",
    text: Texts = None,
    ctx: Ctx = 512,
    scoring: Scoring = "all",
    engine: EngineOpt = None,
    parent_engine: ParentEngine = None,
    child_engine: ChildEngine = None,
    engine_floor: EngineFloor = False,
    sample: Sample = None,
    samples: Samples = 1,
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
    verbose: Verbose = False,
) -> None:
    """Score PARENT and CHILD on the same lm-eval instances and text corpora; report accuracy, flips and KL."""
    setup_logging(verbose)
    from flipcheck.orchestrate.evaluate import evaluate

    def go():
        metric_choice(metric)  # a bad value fails before any model is looked up
        engine_choices(engine, parent_engine, child_engine)
        if until_decided:
            _until_decided_alone(text, noise_floor, engine_floor, child_url, parent_url, executor)
            return _until_decided(parent, children, tasks, out, max_flips, confidence, batch_questions, seed,
                                  dict(include_path=include_path, limit=limit, metric=metric, cache_dir=cache_dir,
                                       use_cache=not no_cache, num_fewshot=num_fewshot, batch_size=batch_size,
                                       device=device, dtype=dtype, trust_remote_code=trust_remote_code))
        served, served_parent = _served_models(children, child_url, child_model, parent_url, parent_model)
        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        lim = None if limit is None else (int(limit) if limit >= 1 else limit)
        chosen = tasks if tasks is not None else ("" if text else DEMO_TASKS)
        with progress_view(len(children or []) + len(served), tasks=bool(chosen), texts=bool(text), title="flipcheck eval") as bar:
            report = evaluate(
                None if parent == "-" else parent, children or [], served=served,
                served_parent=served_parent, tasks=chosen, out=out, include_path=include_path,
                num_fewshot=num_fewshot, limit=lim, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code, cache_dir=cache_dir, use_cache=not no_cache, noise_floor=noise_floor,
                metric=metric, filter=filter_, per_subtask=per_subtask, kl=kl, texts=text, ctx=ctx, scoring=scoring,
                executor=ex, engine=engine, parent_engine=parent_engine, child_engine=child_engine,
                engine_floor=engine_floor, on_step=bar.step, sample=sample, samples=samples,
            )
        show_report(report, out)
        exit_if_failed(report)

    from flipcheck.runlog import third_party_output

    with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
        run_guarded(go)


def _until_decided_alone(text, noise_floor, engine_floor, child_url, parent_url, executor) -> None:
    """`eval --until-decided` scores question tasks round by round: refuse the options it cannot honour."""
    if text or noise_floor or engine_floor or child_url or parent_url or executor != "local":
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


def _until_decided(parent, children, tasks, out, max_flips, confidence, batch, seed, options) -> None:
    """`eval --until-decided`: the sequential gate (flipcheck.decide.until_decided); exit 0 PASS, 1 FAIL."""
    from flipcheck.decide.until_decided import check_options, lines, until_decided, write

    check_options(max_flips, confidence, batch)
    if len(children or []) != 1 or parent == "-":
        raise FlipcheckError("--until-decided judges one CHILD against a named PARENT")
    lim = options.pop("limit")
    block = until_decided(parent, children[0], tasks=(tasks or DEMO_TASKS).split(","), max_flips=max_flips,
                          confidence=confidence, batch=batch, seed=seed, limit=None if lim is None else (int(lim) if lim >= 1 else lim),
                          say=lambda m: err_console.print(m, style="dim", markup=False, highlight=False), **options)
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


def run_cmd(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file, or the name of a bundled recipe (flipcheck list)")],
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/RECIPE-NAME)")] = None,
    parent: Annotated[str | None, typer.Option(help="override the recipe's parent (hub id or folder)")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="override the recipe's tasks (comma-separated)")] = None,
    limit: Annotated[float | None, typer.Option(help="override the questions per task")] = None,
    calibration: Annotated[str | None, typer.Option(help="override the calibration source")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="result cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    metric: Metric = None,
    filter_: Filter = None,
    per_subtask: PerSubtask = False,
    kl: Annotated[str | None, typer.Option("--kl", help="override the recipe's vocabulary KL: topk or exact")] = None,
    batch_size: Annotated[str | None, typer.Option(help="override the recipe's sequences per forward (an integer, or auto)")] = None,
    engine: EngineOpt = None,
    parent_engine: ParentEngine = None,
    child_engine: ChildEngine = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    shards: Shards = 1,
    verbose: Verbose = False,
) -> None:
    """Compress, evaluate every child against the parent, write the report, apply the recipe's gate."""
    setup_logging(verbose)
    from flipcheck.evaluation.settings import parse_batch_size
    from flipcheck.orchestrate.recipe import run_recipe
    from flipcheck.recipes.schema import load_recipe

    def go():
        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        r = load_recipe(recipe)
        update: dict = {}
        if parent:
            update["parent"] = parent
        overrides = {"tasks": tasks.split(",") if tasks else None, "limit": limit, "metric": metric_choice(metric),
                     "filter": filter_, "per_subtask": per_subtask or None, "kl": kl_choice(kl),
                     "batch_size": None if batch_size is None else parse_batch_size(batch_size),
                     **engine_choices(engine, parent_engine, child_engine)}
        if any(v is not None for v in overrides.values()):
            update["evaluation"] = r.evaluation.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        if calibration:
            update["calibration"] = r.calibration.model_copy(update={"source": calibration})
        r = r.model_copy(update=update)
        folder = out or Path("runs") / r.name
        from flipcheck.runlog import third_party_output

        ev = r.evaluation
        with third_party_output(folder, verbose=verbose), progress_view(
                len(r.all_children()), tasks=bool(ev.tasks), texts=bool(ev.texts), compress=True,
                judge=r.judge is not None, title=f"flipcheck run {r.name}") as bar:
            report = run_recipe(r, folder, cache_dir=cache_dir, progress=lambda m: log.info("%s", m),
                                executor=ex, on_step=bar.step)
        show_report(report, folder)
        if r.gate is not None:
            from flipcheck.gate import run_gate

            ok = run_gate(folder / "report.json", **r.gate.budgets(), echo=verdict)
            exit_if_failed(report)
            raise typer.Exit(0 if ok else 1)
        exit_if_failed(report)

    run_guarded(go)


def sweep_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id, folder, or 'demo'")],
    method: Annotated[str, typer.Option("--method", "-m", help="method to sweep")],
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="key=v1,v2,... (repeat for a product grid)")],
    tasks: Annotated[str | None, typer.Option("--tasks", "-t", help="comma-separated lm-eval task names (default: the demo tasks, none with --text)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/sweep-METHOD)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="fixed key=value settings for every point")] = None,
    include_path: Annotated[str | None, typer.Option("--include-path")] = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: Annotated[str, typer.Option(help="sequences per forward, or auto: the largest that fits the device (16 on CPU)")] = "16",
    seed: int = 1234,
    calibration: Annotated[str | None, typer.Option(help="calibration source (default: the parent's own, else wikitext-2 train)")] = None,
    calibration_samples: int = 32,
    calibration_len: int = 256,
    device: Device = None,
    dtype: Dtype = None,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    metric: Metric = None,
    filter_: Filter = None,
    per_subtask: PerSubtask = False,
    kl: KlMethod = "topk",
    text: Texts = None,
    ctx: Ctx = 512,
    scoring: Scoring = "all",
    noise_floor: NoiseFloor = False,
    engine: EngineOpt = None,
    parent_engine: ParentEngine = None,
    child_engine: ChildEngine = None,
    engine_floor: EngineFloor = False,
    sample: Sample = None,
    samples: Samples = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    shards: Shards = 1,
    verbose: Verbose = False,
) -> None:
    """Evaluate one method at several strengths against one parent (evaluated once)."""
    setup_logging(verbose)
    from flipcheck.compressors.registry import parse_set_options
    from flipcheck.orchestrate.recipe import parse_grid, sweep

    def go():
        import math

        from flipcheck.runlog import third_party_output

        metric_choice(metric)
        ex = executor_choice(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        folder = out or Path("runs") / f"sweep-{method}"
        points = parse_grid(grid)
        chosen = tasks if tasks is not None else ([] if text else DEMO_TASKS)
        with third_party_output(folder, verbose=verbose), progress_view(
                math.prod(len(v) for v in points.values()), tasks=bool(chosen), texts=bool(text), compress=True,
                title=f"flipcheck sweep {method}") as bar:
            report = sweep(
                parent, method, points, tasks=chosen, out=folder, settings=parse_set_options(set_),
                calibration={"source": calibration, "samples": calibration_samples, "seq_len": calibration_len},
                include_path=include_path, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, seed=seed,
                device=device, dtype=dtype, cache_dir=cache_dir, progress=lambda m: log.info("%s", m),
                metric=metric, filter=filter_, per_subtask=per_subtask, kl=kl, texts=text, ctx=ctx, scoring=scoring,
                noise_floor=noise_floor, engine_floor=engine_floor, executor=ex, on_step=bar.step, sample=sample,
                samples=samples,
                **engine_choices(engine, parent_engine, child_engine),
            )
        show_report(report, folder)
        exit_if_failed(report)

    run_guarded(go)
