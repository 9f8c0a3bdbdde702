"""What every command shares: the consoles, logging set-up, the one-line error exit, the option types
declared once, and the helpers that check engine, executor and KL choices and show a report."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flipcheck.commands import options as _options
from flipcheck.commands.options import option
from flipcheck.console import CommandConsole
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.options import ModelOptions, ScoreOptions
from flipcheck.executors import EXIT_CHILD_FAILED, executor_options, failed_children
from flipcheck.progress import RunProgress, steps_per_child

console = CommandConsole()  # tables: a file or a pipe gets wide lines, so they keep every figure
log = logging.getLogger("flipcheck.cli")
err_console = Console(stderr=True)  # log lines, progress: rich pads a log line to the width, so 80 in a file


def setup_logging(verbose: bool) -> None:
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


def fail(err: Exception) -> None:
    from rich.markup import escape

    # the message is text: "[llamacpp]" in a pip command must not be read as markup
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def run_guarded(fn):
    try:
        return fn()
    except FlipcheckError as err:
        fail(err)
    except KeyboardInterrupt:
        err_console.print("interrupted: finished tasks are cached; run the same command again to resume")
        raise typer.Exit(130) from None


def _bad_option(err: Exception, verbose: bool) -> None:
    setup_logging(verbose)
    fail(err)


def settings_options(model, **kwargs):
    """A command's options generated from a settings model (:func:`flipcheck.commands.options.settings_options`),
    a bad value one line and exit 2."""
    return _options.settings_options(model, on_error=_bad_option, **kwargs)


DEMO_TASKS = "flipcheck_demo_facts,flipcheck_demo_letters"
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")]
# single options of commands that take a few of the settings; eval, sweep, run, search and localize take
# them all, generated from the same declaration (flipcheck.commands.options.settings_options)
Device = option(ModelOptions, "device")
Dtype = option(ModelOptions, "dtype")
TrustRemote = option(ModelOptions, "trust_remote_code")
Metric = option(ScoreOptions, "metric")
Filter = option(ScoreOptions, "filter")
Executor = Annotated[str, typer.Option("--executor", help="local (one process) or ray (each child, or shard, a Ray task)")]
RayAddress = Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to use (default $RAY_ADDRESS, else auto; none running: a local one)")]
GpusPerChild = Annotated[float | None, typer.Option("--gpus-per-child", help="GPUs per Ray task (default 1 where the cluster has GPUs, else 0)")]
CpusPerChild = Annotated[float | None, typer.Option("--cpus-per-child", help="CPUs per Ray task, also its torch threads (default 1)")]
Shards = Annotated[int, typer.Option("--shards", help="with --executor ray: split each child's task list into this many Ray tasks")]


def executor_choice(executor: str, ray_address, gpus_per_child, cpus_per_child, shards):
    return executor_options(executor, address=ray_address, gpus_per_child=gpus_per_child,
                            cpus_per_child=cpus_per_child, shards=shards)


def exit_if_failed(report: dict) -> None:
    """Exit 3 when a child failed (listed in the report with its reason)."""
    failed = failed_children(report)
    if failed:
        err_console.print(f"{len(failed)} child(ren) failed: {', '.join(f['name'] for f in failed)} (see the report)",
                          markup=False, highlight=False)
        raise typer.Exit(EXIT_CHILD_FAILED)


def progress_view(children: int, *, tasks: bool, texts: bool, compress: bool = False, judge: bool = False, title: str = "flipcheck"):
    """The command's one progress view (children x steps, current step, elapsed, time left)."""
    return RunProgress(err_console, children * steps_per_child(tasks=tasks, texts=texts, compress=compress, judge=judge),
                       title=title)


def verdict(line: str) -> None:
    console.print(line, markup=False, highlight=False)  # "[acc_norm]" in a verdict is text, not markup


def show_report(report: dict, out: Path | None) -> None:
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
        verdict(line)
    if out is not None:
        console.print(f"report: {Path(out) / 'report.html'}  (also report.md, report.json, samples.jsonl)")


def served_pairs(urls: list[str] | None, models: list[str] | None) -> list[tuple[str, str]]:
    """(url, model name) pairs of --child-url / --child-model, one name per URL."""
    urls, models = list(urls or []), list(models or [])
    if len(urls) != len(models):
        raise FlipcheckError(f"{len(urls)} server URL(s) and {len(models)} model name(s): name the served model "
                             "of each --child-url / --parent-url with --child-model / --parent-model (its id in /v1/models)")
    return list(zip(urls, models, strict=True))
