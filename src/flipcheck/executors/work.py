"""The worker side of a remote executor: run one job, named by its function, from plain values.

A job is ``("module:function", values)``: the values are JSON-like (settings, paths), never a
model; the function (the orchestration's, e.g. :mod:`flipcheck.orchestrate.work`) is imported by
name here, so this module depends on nothing it runs. Before the job: torch threads set to the CPUs
the task was given, the result cache root the driver uses, and a check that the run folder the
driver wrote is visible here (another disk is a one-line error, not a silent second run folder).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError

PROBE = ".flipcheck-run"  # written by the driver into --out: a worker that cannot see it has another disk


def run_job(fn: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process (a worker): ``fn(job, timings)`` -> plain values, returned with
    ``timings`` (seconds of each phase the job timed)."""
    timings: dict[str, float] = {}
    _setup_worker(job)
    _check_run_folder(job)
    module, _, name = fn.partition(":")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise FlipcheckError(f"unknown job function {fn!r}") from err
    out = func(job, timings)
    out["timings"] = timings
    return out


def _setup_worker(job: dict[str, Any]) -> None:
    """Torch threads = the CPUs the task was given; the cache root the driver uses."""
    threads = int(job.get("threads") or 1)
    try:
        import torch
    except ImportError:  # a job that needs no torch
        pass
    else:
        torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.get("cache_dir"):
        os.environ["FLIPCHECK_CACHE"] = str(job["cache_dir"])


def _check_run_folder(job: dict[str, Any]) -> None:
    out = job.get("out")
    if out and not (Path(out) / PROBE).is_file():
        raise FlipcheckError(
            f"this Ray worker cannot see the run folder {out} (no {PROBE} there): --out must be on a path "
            "every node of the cluster can read and write (a shared file system)"
        )


class Clock:
    """Seconds per named phase, added into a job's `timings`."""

    def __init__(self, timings: dict[str, float]):
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now
