"""The demo command: a showcase run, offline toy or SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import Verbose, console, run_guarded, setup_logging
from flipcheck.errors import FlipcheckError
from flipcheck.runlog import third_party_output


def demo_cmd(
    out: Annotated[Path | None, typer.Option(help="run folder for the report (default runs/demo, runs/demo-real with --real)")] = None,
    retrain: Annotated[bool, typer.Option(help="train the demo parent again even if cached")] = False,
    quick: Annotated[bool, typer.Option(help="fewer methods and strengths")] = False,
    real: Annotated[bool, typer.Option("--real", help="SmolLM2-135M-Instruct (built once from PyPI) against GPTQ W4A16 g64, RTN W8A16, Wanda 30 % and noise on real-world questions, instead of the offline toy")] = False,
    verbose: Verbose = False,
) -> None:
    """Showcase: compress a parent several ways and compare. Offline toy by default; --real uses SmolLM2-135M."""
    setup_logging(verbose)
    from flipcheck.demo_run import run_demo, run_real_demo

    def go():
        if real:
            if retrain or quick:
                raise FlipcheckError(f"--{'retrain' if retrain else 'quick'} is an option of the toy demo; --real takes neither")
            return run_real_demo(out or Path("runs/demo-real"), console=console)
        return run_demo(out or Path("runs/demo"), retrain=retrain, quick=quick, console=console)


    folder = out or Path("runs/demo-real" if real else "runs/demo")
    with third_party_output(folder, verbose=verbose):  # third-party warnings and bars -> the run's run.log
        run_guarded(go)
