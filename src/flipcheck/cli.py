"""The `flipcheck` command: thin wrappers that parse options and call library functions."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flipcheck.console import CommandConsole
from flipcheck.errors import FlipcheckError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress a language model and measure how far it drifts from its parent: flips, KL, margins.",
)
console = CommandConsole()  # tables: a file or a pipe gets wide lines, so they keep every figure
log = logging.getLogger("flipcheck.cli")
err_console = Console(stderr=True)  # log lines, progress: rich pads a log line to the width, so 80 in a file


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("flipcheck").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("lm_eval", "lm-eval", "datasets", "transformers", "llmcompressor", "compressed_tensors", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Third-party progress bars (dataset building, shard writing, calibration passes) drown the
        # terminal; flipcheck's own bars pass `disable` explicitly and stay. tqdm reads this at import.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    try:
        from loguru import logger as _loguru  # llm-compressor logs through loguru

        _loguru.remove()
        _loguru.add(sys.stderr, level="WARNING")
    except ImportError:
        pass


def _fail(err: Exception) -> None:
    from rich.markup import escape

    # the message is text: "[llamacpp]" in a pip command must not be read as markup
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _run(fn):
    try:
        return fn()
    except FlipcheckError as err:
        _fail(err)
    except KeyboardInterrupt:
        err_console.print("interrupted: finished tasks are cached; run the same command again to resume")
        raise typer.Exit(130) from None


DEMO_TASKS = "flipcheck_demo_facts,flipcheck_demo_letters"
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, auto (default: cuda if available; auto, device_map across them, with several GPUs)")]
Dtype = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 (default: float32 on CPU, bf16 on GPU)")]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the hub (off by default).")]
Metric = Annotated[str | None, typer.Option("--metric", help="headline and gate figure: acc or acc_norm (default: acc_norm where a task reports it)")]
Filter = Annotated[str | None, typer.Option("--filter", help="lm-eval filter of generative tasks, e.g. strict-match (default: the task's first)")]
KlMethod = Annotated[str, typer.Option("--kl", help="vocabulary KL of every child: topk (against the cached parent's top-K and sampled tail), bound (its top-K + tail-bucket lower bound; what a served model allows) or exact (parent in lock-step, 2 passes per child)")]
PerSubtask = Annotated[bool, typer.Option("--per-subtask", help="every task of a group its own row and verdict (default: a group is one row, as named)")]
Texts = Annotated[list[str] | None, typer.Option("--text", help="text corpus scored token by token (KL both ways, top-1, Δp, perplexity): a .txt/.jsonl file or hf:NAME[:CONFIG[:SPLIT]] (split test by default); repeat for several")]
Ctx = Annotated[int, typer.Option("--ctx", help="tokens per corpus window (text corpora and perplexity tasks such as wikitext)")]
Scoring = Annotated[str, typer.Option("--scoring", help="corpus positions scored per window: all, or half (llama.cpp's: the second half of each window)")]
EngineOpt = Annotated[str | None, typer.Option("--engine", help="scoring engine of every model: transformers, llama.cpp (GGUF files) (default: transformers; llama.cpp for .gguf when installed)")]
ParentEngine = Annotated[str | None, typer.Option("--parent-engine", help="the parent's scoring engine, instead of --engine")]
ChildEngine = Annotated[str | None, typer.Option("--child-engine", help="every child's scoring engine, instead of --engine")]
Sample = Annotated[str | None, typer.Option("--sample", help="generative tasks: sample in step with the parent (same Gumbel noise per question, sample and position), e.g. temperature=0.7,top_p=0.95 (default: greedy)")]
Samples = Annotated[int, typer.Option("--samples", help="generations per question with --sample")]
EngineFloor = Annotated[bool, typer.Option("--engine-floor", help="also score the parent on another engine, same weights: llama.cpp on an F32 GGUF of it (transformers for a GGUF or vLLM parent)")]
NoiseFloor = Annotated[bool, typer.Option("--noise-floor", help="also score the parent against itself under numerics alone: another batch size, bf16-rounded weights, the other attention implementation")]
Executor = Annotated[str, typer.Option("--executor", help="local (one process) or ray (each child, or shard, a Ray task)")]
RayAddress = Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to use (default $RAY_ADDRESS, else auto; none running: a local one)")]
GpusPerChild = Annotated[float | None, typer.Option("--gpus-per-child", help="GPUs per Ray task (default 1 where the cluster has GPUs, else 0)")]
CpusPerChild = Annotated[float | None, typer.Option("--cpus-per-child", help="CPUs per Ray task, also its torch threads (default 1)")]
Shards = Annotated[int, typer.Option("--shards", help="with --executor ray: split each child's task list into this many Ray tasks")]


def _executor(executor: str, ray_address, gpus_per_child, cpus_per_child, shards):
    from flipcheck.executors import executor_options

    return executor_options(executor, address=ray_address, gpus_per_child=gpus_per_child,
                            cpus_per_child=cpus_per_child, shards=shards)


def _exit_if_failed(report: dict) -> None:
    """Exit 3 when a child failed (listed in the report with its reason)."""
    from flipcheck.executors import EXIT_CHILD_FAILED, failed_children

    failed = failed_children(report)
    if failed:
        err_console.print(f"{len(failed)} child(ren) failed: {', '.join(f['name'] for f in failed)} (see the report)",
                          markup=False, highlight=False)
        raise typer.Exit(EXIT_CHILD_FAILED)


@app.command("eval")
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
    _setup_logging(verbose)
    from flipcheck.evaluation.samples import check_metric
    from flipcheck.orchestrate.evaluate import evaluate

    def go():
        check_metric(metric)  # a bad value fails before any model is looked up
        _engine_choices(engine, parent_engine, child_engine)
        if until_decided:
            if text or noise_floor or engine_floor or child_url or parent_url or executor != "local":
                raise FlipcheckError("--until-decided scores question tasks round by round, here: drop --text, "
                                     "--noise-floor, --engine-floor, --child-url/--parent-url and --executor ray")
            return _until_decided(parent, children, tasks, out, max_flips, confidence, batch_questions, seed,
                                  dict(include_path=include_path, limit=limit, metric=metric, cache_dir=cache_dir,
                                       use_cache=not no_cache, num_fewshot=num_fewshot, batch_size=batch_size,
                                       device=device, dtype=dtype, trust_remote_code=trust_remote_code))
        served = _served(child_url, child_model)
        served_parent = _served([parent_url] if parent_url else [], [parent_model] if parent_model else [])
        if not children and not served:
            raise FlipcheckError("give at least one CHILD, or a served child with --child-url URL --child-model NAME")
        ex = _executor(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        lim = None if limit is None else (int(limit) if limit >= 1 else limit)
        chosen = tasks if tasks is not None else ("" if text else DEMO_TASKS)
        with _progress(len(children or []) + len(served), tasks=bool(chosen), texts=bool(text), title="flipcheck eval") as bar:
            report = evaluate(
                None if parent == "-" else parent, children or [], served=served,
                served_parent=served_parent[0] if served_parent else None, tasks=chosen, out=out, include_path=include_path,
                num_fewshot=num_fewshot, limit=lim, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code, cache_dir=cache_dir, use_cache=not no_cache, noise_floor=noise_floor,
                metric=metric, filter=filter_, per_subtask=per_subtask, kl=kl, texts=text, ctx=ctx, scoring=scoring,
                executor=ex, engine=engine, parent_engine=parent_engine, child_engine=child_engine,
                engine_floor=engine_floor, on_step=bar.step, sample=sample, samples=samples,
            )
        _show(report, out)
        _exit_if_failed(report)

    from flipcheck.runlog import third_party_output

    with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
        _run(go)


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
        _verdict(line)
    if out is not None:
        console.print(f"report: {write(out, block)}")
    raise typer.Exit(0 if block["verdict"] == "pass" else 1)


def _progress(children: int, *, tasks: bool, texts: bool, compress: bool = False, judge: bool = False, title: str = "flipcheck"):
    """The command's one progress view (children x steps, current step, elapsed, time left)."""
    from flipcheck.progress import RunProgress, steps_per_child

    return RunProgress(err_console, children * steps_per_child(tasks=tasks, texts=texts, compress=compress, judge=judge),
                       title=title)


def _verdict(line: str) -> None:
    console.print(line, markup=False, highlight=False)  # "[acc_norm]" in a verdict is text, not markup


def _show(report: dict, out: Path | None) -> None:
    from flipcheck.evaluation.report import render_table
    from flipcheck.evaluation.report.corpus import corpus_table
    from flipcheck.evaluation.report.text import has_questions

    if has_questions(report):  # text corpora or judged answers alone: no per-task table
        console.print(render_table(report, width=console.width))
    texts = corpus_table(report, width=console.width)
    if texts is not None:
        console.print(texts)
    from flipcheck.judge.report import terminal_lines

    for line in terminal_lines(report):
        _verdict(line)
    if out is not None:
        console.print(f"report: {Path(out) / 'report.html'}  (also report.md, report.json, samples.jsonl)")


@app.command("compare")
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
    _setup_logging(verbose)
    from flipcheck.evaluation.compare import compare

    def go():
        report = compare(parent_samples, child_samples, task=task, out=out, metric=metric, filter_name=filter_)
        _show(report, out)

    _run(go)


@app.command("compress")
def compress_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder")],
    method: Annotated[list[str], typer.Option("--method", "-m", help="method name; repeat for a chain (applied in order)")],
    out: Annotated[Path, typer.Option(help="folder for the child (Hugging Face format + flipcheck.json)")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="key=value setting; prefix with METHOD. in a chain")] = None,
    calibration: Annotated[str | None, typer.Option(help="a .txt/.jsonl file or folder, hf:NAME[:CONFIG[:SPLIT]], or 'demo' (default: the parent's own, else wikitext-2 train)")] = None,
    calibration_samples: Annotated[int, typer.Option(help="calibration sequences")] = 32,
    calibration_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 256,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = False,
) -> None:
    """Compress PARENT with one method (or a chain) and save the child."""
    _setup_logging(verbose)
    from flipcheck.compressors.calibration import CalibrationConfig
    from flipcheck.compressors.pipeline import compress
    from flipcheck.compressors.registry import parse_set_options

    def go():
        steps = _steps_from_options(method, parse_set_options(set_))
        cal = CalibrationConfig(source=calibration, samples=calibration_samples, seq_len=calibration_len, seed=seed)
        res = compress(parent, steps, out=out, calibration=cal, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        from flipcheck.terminal import compression_table

        console.print(compression_table(res.reports))
        console.print(f"child saved to {res.out}")

    _run(go)


def _steps_from_options(methods: list[str], settings: dict[str, str]) -> list[tuple[str, dict]]:
    """--set key=value applies to the single method; in a chain, keys are METHOD.key."""
    from flipcheck.compressors.registry import get_method

    for m in methods:
        get_method(m)
    if len(methods) == 1:
        return [(methods[0], {k.split(".", 1)[1] if k.startswith(methods[0] + ".") else k: v for k, v in settings.items()})]
    per: dict[str, dict] = {m: {} for m in methods}
    for k, v in settings.items():
        if "." not in k or k.split(".", 1)[0] not in per:
            raise FlipcheckError(f"--set {k}={v}: with several methods, prefix the key with one of {', '.join(methods)} (e.g. {methods[0]}.KEY)")
        m, key = k.split(".", 1)
        per[m][key] = v
    return [(m, per[m]) for m in methods]


@app.command("list")
def list_cmd(
    tasks: Annotated[bool, typer.Option("--tasks", help="also list every task lm-eval knows (long)")] = False,
    include_path: Annotated[list[str] | None, typer.Option("--include-path")] = None,
) -> None:
    """Methods with their settings and defaults, bundled recipes, and (with --tasks) lm-eval tasks."""
    from flipcheck.terminal import methods_table, recipes_table

    def go():
        console.print(methods_table())
        t = recipes_table()
        if t is not None:
            console.print(t)
        if tasks:
            from flipcheck.evaluation.tasks import known_tasks

            names = known_tasks(include_path)
            console.print(f"[bold]{len(names)} lm-eval tasks, groups and tags[/]")
            console.print(", ".join(names), highlight=False)

    _run(go)


@app.command("gate")
def gate_cmd(
    report: Annotated[Path, typer.Argument(help="report.json (or its folder) from eval/run/sweep")],
    max_flips: Annotated[str | None, typer.Option(help="largest allowed flip rate, e.g. 2% or 0.02")] = None,
    max_kl: Annotated[str | None, typer.Option(help="largest allowed mean KL, e.g. 0.01")] = None,
    min_acc_delta: Annotated[str | None, typer.Option(help="smallest allowed accuracy change, e.g. -1%")] = None,
    min_acc: Annotated[str | None, typer.Option(help="smallest allowed child accuracy, e.g. 60%")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="judge acc or acc_norm where a task has it (default: the report's headline)")] = None,
    max_kl_text: Annotated[str | None, typer.Option(help="largest allowed mean KL(P‖C) per token on each text corpus, e.g. 0.02")] = None,
    max_ppl_ratio: Annotated[str | None, typer.Option(help="largest allowed PPL_child / PPL_parent on each text corpus, e.g. 1.05")] = None,
    over_floor: Annotated[bool, typer.Option("--over-floor", help="judge flips and KL as the excess over the report's noise floor")] = False,
    min_judge_delta: Annotated[str | None, typer.Option(help="smallest allowed judged score change (1-10 scale), e.g. -0.5")] = None,
    confidence: Annotated[str | None, typer.Option(help="judge flips by their one-sided Clopper-Pearson upper bound and Δacc by its lower bound at this level, e.g. 0.95 (default: point estimates)")] = None,
    min_survival: Annotated[str | None, typer.Option(help="smallest allowed share of generations identical to the parent's through T tokens, T:SHARE, e.g. 128:90%")] = None,
    max_length_ratio: Annotated[str | None, typer.Option(help="largest allowed median of generated tokens child / parent, e.g. 1.1")] = None,
) -> None:
    """Exit 0 when every child and task is within budget, 1 otherwise (one verdict line each)."""
    from flipcheck.gate import run_gate

    def go():
        ok = run_gate(report, max_flips=max_flips, max_kl=max_kl, min_acc_delta=min_acc_delta, min_acc=min_acc,
                      metric=metric, max_kl_text=max_kl_text, max_ppl_ratio=max_ppl_ratio, over_floor=over_floor,
                      min_judge_delta=min_judge_delta, echo=_verdict, confidence=confidence,
                      min_survival=min_survival, max_length_ratio=max_length_ratio)
        raise typer.Exit(0 if ok else 1)

    _run(go)


@app.command("run")
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
    _setup_logging(verbose)
    from flipcheck.evaluation.samples import check_metric
    from flipcheck.evaluation.settings import parse_batch_size
    from flipcheck.orchestrate.recipe import run_recipe
    from flipcheck.recipes.schema import load_recipe

    def go():
        ex = _executor(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        r = load_recipe(recipe)
        update: dict = {}
        if parent:
            update["parent"] = parent
        overrides = {"tasks": tasks.split(",") if tasks else None, "limit": limit, "metric": check_metric(metric),
                     "filter": filter_, "per_subtask": per_subtask or None, "kl": _kl_choice(kl),
                     "batch_size": None if batch_size is None else parse_batch_size(batch_size),
                     **_engine_choices(engine, parent_engine, child_engine)}
        if any(v is not None for v in overrides.values()):
            update["evaluation"] = r.evaluation.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        if calibration:
            update["calibration"] = r.calibration.model_copy(update={"source": calibration})
        r = r.model_copy(update=update)
        folder = out or Path("runs") / r.name
        from flipcheck.runlog import third_party_output

        ev = r.evaluation
        with third_party_output(folder, verbose=verbose), _progress(
                len(r.all_children()), tasks=bool(ev.tasks), texts=bool(ev.texts), compress=True,
                judge=r.judge is not None, title=f"flipcheck run {r.name}") as bar:
            report = run_recipe(r, folder, cache_dir=cache_dir, progress=lambda m: log.info("%s", m),
                                executor=ex, on_step=bar.step)
        _show(report, folder)
        if r.gate is not None:
            from flipcheck.gate import run_gate

            ok = run_gate(folder / "report.json", **r.gate.budgets(), echo=_verdict)
            _exit_if_failed(report)
            raise typer.Exit(0 if ok else 1)
        _exit_if_failed(report)

    _run(go)


def _engine_choices(engine, parent_engine, child_engine) -> dict[str, str | None]:
    """The engine options, each checked (one line, exit 2, naming the allowed engines)."""
    from flipcheck.evaluation.engines import check_engine

    return {"engine": check_engine(engine), "parent_engine": check_engine(parent_engine),
            "child_engine": check_engine(child_engine)}


def _served(urls: list[str] | None, models: list[str] | None) -> list[tuple[str, str]]:
    """(url, model name) pairs of --child-url / --child-model, one name per URL."""
    urls, models = list(urls or []), list(models or [])
    if len(urls) != len(models):
        raise FlipcheckError(f"{len(urls)} server URL(s) and {len(models)} model name(s): name the served model "
                             "of each --child-url / --parent-url with --child-model / --parent-model (its id in /v1/models)")
    return list(zip(urls, models, strict=True))


def _kl_choice(kl: str | None) -> str | None:
    from flipcheck.evaluation.kl import KL_METHODS

    if kl is not None and kl not in KL_METHODS:
        raise FlipcheckError(f"--kl {kl!r}: allowed are {', '.join(KL_METHODS)}")
    return kl


@app.command("sweep")
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
    _setup_logging(verbose)
    from flipcheck.compressors.registry import parse_set_options
    from flipcheck.evaluation.samples import check_metric
    from flipcheck.orchestrate.recipe import parse_grid, sweep

    def go():
        import math

        from flipcheck.runlog import third_party_output

        check_metric(metric)
        ex = _executor(executor, ray_address, gpus_per_child, cpus_per_child, shards)
        folder = out or Path("runs") / f"sweep-{method}"
        points = parse_grid(grid)
        chosen = tasks if tasks is not None else ([] if text else DEMO_TASKS)
        with third_party_output(folder, verbose=verbose), _progress(
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
                **_engine_choices(engine, parent_engine, child_engine),
            )
        _show(report, folder)
        _exit_if_failed(report)

    _run(go)


@app.command("judge")
def judge_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder (a chat model)")],
    children: Annotated[list[str], typer.Argument(help="one or more child models (hub ids or folders)")],
    judge_url: Annotated[str, typer.Option("--judge-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")],
    judge_model: Annotated[str, typer.Option("--judge-model", help="the judge model the endpoint serves")],
    prompts: Annotated[str, typer.Option(help="JSONL file (flipcheck's or MT-Bench's question.jsonl), hf:NAME[:CONFIG[:SPLIT]], or demo")] = "demo",
    judge_api_key_env: Annotated[str, typer.Option("--judge-api-key-env", help="environment variable holding the API key (a local server needs none)")] = "OPENAI_API_KEY",
    mode: Annotated[str, typer.Option(help="single (1-10 per answer), pairwise (parent vs child, both orders) or both")] = "both",
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer turn of parent and children (greedy)")] = 256,
    judge_max_tokens: Annotated[int, typer.Option("--judge-max-tokens", help="tokens per judge reply")] = 512,
    concurrency: Annotated[int, typer.Option(help="judge requests in flight at once")] = 4,
    limit: Annotated[int | None, typer.Option(help="judge only the first N prompts")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.json, report.md, report.html, judge.jsonl")] = None,
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    cache_dir: Annotated[Path | None, typer.Option(help="answer and verdict cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not read or write cached answers and verdicts")] = False,
    verbose: Verbose = False,
) -> None:
    """Parent and children answer free-form prompts; an LLM judge grades them (1-10) and compares them pairwise."""
    _setup_logging(verbose)
    from flipcheck.judge.client import JudgeSettings
    from flipcheck.judge.generate import GenerationSettings
    from flipcheck.judge.report import terminal_lines
    from flipcheck.judge.run import check_mode, judge_models

    def go():
        check_mode(mode)
        if limit is not None and limit < 1:
            raise FlipcheckError(f"--limit {limit}: must be at least 1")
        settings = JudgeSettings(url=judge_url, model=judge_model, api_key_env=judge_api_key_env,
                                 max_tokens=judge_max_tokens, concurrency=concurrency)
        gen = GenerationSettings(max_new_tokens=max_new_tokens, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        report = judge_models(parent, children, prompts=prompts, settings=settings, gen=gen, mode=mode, out=out,
                              limit=limit, cache_dir=cache_dir, use_cache=not no_cache,
                              progress=lambda m: console.print(f"[dim]{m}[/]"))
        for line in terminal_lines(report):
            _verdict(line)
        if out is not None:
            console.print(f"report: {Path(out) / 'report.html'}  (also report.md, report.json, judge.jsonl)")

    from flipcheck.runlog import third_party_output

    with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
        _run(go)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path | None, typer.Option(help="run folder for the report (default runs/demo, runs/demo-real with --real)")] = None,
    retrain: Annotated[bool, typer.Option(help="train the demo parent again even if cached")] = False,
    quick: Annotated[bool, typer.Option(help="fewer methods and strengths")] = False,
    real: Annotated[bool, typer.Option("--real", help="SmolLM2-135M-Instruct (built once from PyPI) against GPTQ W4A16 g64, RTN W8A16, Wanda 30 % and noise on real-world questions, instead of the offline toy")] = False,
    verbose: Verbose = False,
) -> None:
    """Showcase: compress a parent several ways and compare. Offline toy by default; --real uses SmolLM2-135M."""
    _setup_logging(verbose)
    from flipcheck.demo_run import run_demo, run_real_demo

    def go():
        if real:
            if retrain or quick:
                raise FlipcheckError(f"--{'retrain' if retrain else 'quick'} is an option of the toy demo; --real takes neither")
            return run_real_demo(out or Path("runs/demo-real"), console=console)
        return run_demo(out or Path("runs/demo"), retrain=retrain, quick=quick, console=console)

    from flipcheck.runlog import third_party_output

    folder = out or Path("runs/demo-real" if real else "runs/demo")
    with third_party_output(folder, verbose=verbose):  # third-party warnings and bars -> the run's run.log
        _run(go)


# --- deciding (issue 16): plan -------------------------------------------------------------------


@app.command("plan")
def plan_cmd(
    max_flips: Annotated[str, typer.Option(help="the flip budget to decide, e.g. 2%")],
    expected: Annotated[str, typer.Option(help="the flip rate you expect the child to have, e.g. 1% (below --max-flips)")],
    confidence: Annotated[str, typer.Option(help="confidence of the gate, e.g. 0.95")] = "0.95",
    confirm: Annotated[str | None, typer.Option(help="also for `search --confirm SHARE`: the questions each split needs")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="with --confirm: search's --max-candidates (its split is judged at 1 - (1 - c)/K)")] = 8,
) -> None:
    """How many questions a flip budget needs: the smallest n such that ceil(expected*n) flips in n
    questions have a one-sided Clopper-Pearson upper bound <= --max-flips at --confidence (so a child
    flipping the expected rate passes `gate --confidence`); also from which n every larger n does."""
    from flipcheck.evaluation.confidence import plan_questions
    from flipcheck.gate import parse_budget

    def go():
        p = plan_questions(parse_budget(max_flips, "--max-flips"), parse_budget(expected, "--expected"), confidence)
        console.print(f"{p.questions} questions: {p.flips} flips ({p.expected:.3%} expected) have a {p.confidence:.0%} "
                      f"upper bound of {p.bound:.3%} <= {p.budget:.3%}", highlight=False)
        if p.every_from > p.questions:
            console.print(f"every n >= {p.every_from} decides it too (checked to {p.checked_to}); some n between fail, "
                          "as ceil(expected*n) steps up", highlight=False)
        if confirm is not None:
            from flipcheck.decide.splits import split_plan

            for line in split_plan(p, confirm, candidates):
                console.print(line, highlight=False)

    _run(go)


# --- deciding (issue 16): localize ---------------------------------------------------------------


@app.command("localize")
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
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = False,
) -> None:
    """Rank the child's decoder layers and Linear modules by their share of the damage: output error
    on the same inputs (relative error, cosine, SQNR), residual-stream error, and the text KL of the
    child's layer swapped into the parent and of the parent's layer restored in the child."""
    _setup_logging(verbose)
    from flipcheck.decide.localize import localize
    from flipcheck.decide.localize_report import localize_tables, write_localize

    def go():
        from flipcheck.runlog import third_party_output

        with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
            block = localize(parent, child, text=text, tasks=[t for t in tasks.split(",") if t], include_path=include_path,
                             windows=windows, ctx=ctx, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code, progress=lambda m: err_console.print(f"[dim]{m}[/]"))
        for table in localize_tables(block, top=top):
            console.print(table)
        if out is not None:
            write_localize(out, block)
            console.print(f"report: {Path(out) / 'report.md'}  (also report.json, localize.png)")

    _run(go)


# --- deciding (issue 16): search -----------------------------------------------------------------


@app.command("search")
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
    include_path: Annotated[str | None, typer.Option("--include-path", help="folder of local lm-eval task YAMLs")] = None,
    num_fewshot: int | None = None,
    limit: Annotated[float | None, typer.Option(help="questions per task (count, or fraction if < 1)")] = None,
    batch_size: Annotated[str, typer.Option(help="sequences per forward, or auto")] = "16",
    seed: int = 1234,
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
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    cache_dir: Annotated[Path | None, typer.Option(help="result cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    gpus_per_child: GpusPerChild = None,
    cpus_per_child: CpusPerChild = None,
    verbose: Verbose = False,
) -> None:
    """The most compressed child (per-layer choices) whose verified distance meets every budget: per-layer
    sensitivities on text, knapsack proposals, each one compressed and evaluated for real. Exit 0 with a
    winner (OUT/recipe.yaml), 1 when no candidate meets the budgets."""
    _setup_logging(verbose)
    from flipcheck.compressors.registry import parse_set_options
    from flipcheck.decide.search import search
    from flipcheck.decide.search_report import search_table, summary_lines
    from flipcheck.evaluation.samples import check_metric

    def go():
        from flipcheck.runlog import third_party_output

        check_metric(metric)
        _kl_choice(kl)
        ex = _executor(executor, ray_address, gpus_per_child, cpus_per_child, 1)
        chosen = tasks.split(",") if tasks else ([] if text else DEMO_TASKS.split(","))
        steps = max_candidates + 3  # the children verified at most, plus sensitivities and confirmations (an upper bound)
        with third_party_output(out, verbose=verbose), _progress(steps, tasks=bool(chosen), texts=bool(text), compress=True,
                                                                 title="flipcheck search") as bar:
            block = search(
                parent, method, choices, out=out, settings=parse_set_options(set_),
                budgets={"max_flips": max_flips, "max_kl": max_kl, "max_kl_text": max_kl_text, "max_ppl_ratio": max_ppl_ratio,
                         "min_acc_delta": min_acc_delta, "min_acc": min_acc},
                confidence=confidence, metric=metric, tasks=chosen, include_path=include_path, num_fewshot=num_fewshot,
                limit=limit, batch_size=batch_size, seed=seed, texts=list(text or []), ctx=ctx, kl=kl, scoring=scoring,
                filter=filter_, per_subtask=per_subtask, **_engine_choices(engine, parent_engine, child_engine),
                calibration={"source": calibration, "samples": calibration_samples, "seq_len": calibration_len},
                probe_windows=probe_windows, probe_ctx=probe_ctx, max_candidates=max_candidates, per_round=per_round,
                confirm=None if no_confirm else confirm, confirm_tasks=confirm_tasks.split(",") if confirm_tasks else (),
                device=device, dtype=dtype, trust_remote_code=trust_remote_code, cache_dir=cache_dir, executor=ex,
                progress=lambda m: err_console.print(m, style="dim", markup=False, highlight=False), on_step=bar.step)
        console.print(search_table(block))
        for line in summary_lines(block):
            _verdict(line)
        console.print(f"report: {Path(out) / 'report.html'}  (also report.md, report.json"
                      + (", recipe.yaml)" if block.get("winner") else ")"))
        raise typer.Exit(0 if block.get("winner") else 1)

    _run(go)


def main() -> None:  # pragma: no cover
    app()
