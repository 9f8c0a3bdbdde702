"""The Ray executor: each child (or each evaluation shard of it) is one Ray task.

The driver connects (``--ray-address``, else $RAY_ADDRESS, else ``auto``; with no cluster running
it starts a local one and says so), scores the parent once into the shared result cache, then
submits one task per child with plain settings and paths (:mod:`.work`). A failed task (an
exception, a killed worker) is submitted once more; a second failure records the child as failed
with a one-line reason while the others finish. The report is rewritten after every finished
child, in the recipe's order, so Ctrl-C (which cancels the running tasks) keeps every finished
child and the same command resumes from the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.executors import ExecutorOptions, failed_entry, finish_report
from flipcheck.executors.shards import split_units
from flipcheck.executors.work import PROBE, run_job

log = logging.getLogger(__name__)

ATTEMPTS = 2  # a failed task is retried once
INSTALL = "pip install 'flipcheck[ray]'"


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise FlipcheckError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from err
    return ray


def connect(opts: ExecutorOptions, say: Callable[[str], None]) -> str:
    """Connect to the cluster at the options' address; start a local one where none runs."""
    ray = import_ray()
    if ray.is_initialized():
        return "the cluster this process is connected to"
    address = opts.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        say(f"ray: connected to the cluster at {address}")
        return address
    except ConnectionError as err:
        if address != "auto":
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FlipcheckError(
                f"--ray-address {address}: no Ray cluster answers there ({first}); start one with `ray start --head` "
                "or leave --ray-address and RAY_ADDRESS unset to start a local one"
            ) from err
    ray.init(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    say(f"ray: no cluster running; started a local one ({cpus} CPUs) for this run")
    return "local"


@dataclass
class Resources:
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def resources(opts: ExecutorOptions) -> Resources:
    """Per child: the options' CPUs/GPUs, else one GPU where the cluster has GPUs, else one CPU."""
    import ray

    total = ray.cluster_resources()
    gpus = opts.gpus_per_child if opts.gpus_per_child is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
    cpus = opts.cpus_per_child if opts.cpus_per_child is not None else 1.0
    for what, need in (("CPU", cpus), ("GPU", gpus)):
        have = total.get(what, 0)
        if need > have:
            flag = "--cpus-per-child" if what == "CPU" else "--gpus-per-child"
            raise FlipcheckError(f"{flag} {need:g}: the Ray cluster has {have:g} {what}s in all; ask for at most that")
    return Resources(cpus=cpus, gpus=gpus)


def check_folders(out: Path | None, cache) -> None:
    """--out and the cache must be writable here; --out gets the probe a worker looks for."""
    if not cache.enabled:
        raise FlipcheckError("--executor ray needs the result cache (workers read the parent from it): drop --no-cache")
    for what, folder in (("--cache-dir", Path(cache.root)), ("--out", out)):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / PROBE
            probe.write_text("written by the flipcheck driver; Ray workers check they can see it\n")
        except OSError as err:
            raise FlipcheckError(f"{what} {folder}: cannot write there ({err.strerror or err})") from err


@dataclass
class _Child:
    index: int
    name: str
    first: tuple[str, dict] | None = None  # ("child" | "compress", job), or None: shards straight away
    shard_jobs: Callable[[dict | None], list[dict]] | None = None
    merge: Callable[[dict | None], tuple[dict, list[dict]]] | None = None
    result: dict | None = None
    shards_left: int = 0
    failed: bool = False
    refs: list = field(default_factory=list)


def _reason(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip()
    first = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if isinstance(err, FlipcheckError):
        return first or "error"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _drive(children: list[_Child], res: Resources, say: Callable[[str], None],
           on_done: Callable[[_Child, dict, list[dict]], None],
           on_failed: Callable[[_Child, str, int], None]) -> tuple[int, dict[str, float]]:
    """Run every child's tasks to completion (or failure): the parent passes the workers made and
    the seconds of each phase summed over the workers' tasks."""
    import ray

    remote = ray.remote(run_job)
    pending: dict[Any, tuple[_Child, str, dict, int]] = {}
    passes = 0
    timings: dict[str, float] = {}

    def submit(c: _Child, kind: str, job: dict, attempt: int = 1) -> None:
        ref = remote.options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0,
                             name=f"flipcheck-{kind}-{c.name}").remote(kind, {**job, "threads": res.threads})
        pending[ref] = (c, kind, job, attempt)
        c.refs.append(ref)

    def start_shards(c: _Child) -> None:
        jobs = c.shard_jobs(c.result)
        c.shards_left = len(jobs)
        for job in jobs:
            submit(c, "shard", job)

    def fail(c: _Child, reason: str, attempts: int) -> None:
        c.failed = True
        for ref in c.refs:
            if ref in pending:
                ray.cancel(ref, force=True)
        on_failed(c, reason, attempts)

    for c in children:
        if c.first is not None:
            submit(c, *c.first)
        else:
            start_shards(c)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C through
            if not ready:
                continue
            c, kind, job, attempt = pending.pop(ready[0])
            if c.failed:
                continue
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                reason = _reason(err)
                if attempt < ATTEMPTS:
                    say(f"[{c.index}] {c.name}: {kind} task failed ({reason}); retrying once")
                    submit(c, kind, job, attempt + 1)
                else:
                    fail(c, reason, attempt)
                continue
            passes += int(out.get("parent_passes", 0))
            for phase, seconds in (out.get("timings") or {}).items():
                timings[phase] = timings.get(phase, 0.0) + float(seconds)
            if kind == "child":
                on_done(c, out["entry"], out["rows"])
            elif kind == "compress":
                c.result = out
                start_shards(c)
            else:
                c.shards_left -= 1
                if c.shards_left == 0:
                    try:
                        entry, rows = c.merge(c.result)
                    except Exception as err:  # the merge runs here: a failure of it fails this child only
                        fail(c, _reason(err), 1)
                        continue
                    on_done(c, entry, rows)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        say(f"interrupted: cancelled {len(pending)} running Ray task(s); finished children are kept")
        raise
    return passes, timings


class _Collector:
    """Finished and failed children in the run's order; the report rewritten after each."""

    def __init__(self, n: int, write: Callable[[list[dict], list[dict], list[dict]], None], say):
        self.n, self.write, self.say = n, write, say
        self.entries: dict[int, dict] = {}
        self.rows: dict[int, list[dict]] = {}
        self.failed: dict[int, dict] = {}

    def done(self, c: _Child, entry: dict, rows: list[dict]) -> None:
        self.entries[c.index], self.rows[c.index] = entry, rows
        self.write(*self.ordered())  # on disk before anything else can happen (Ctrl-C included)
        self.say(f"[{c.index}/{self.n}] {c.name}: done")

    def fail(self, c: _Child, reason: str, attempts: int) -> None:
        self.failed[c.index] = failed_entry(c.name, reason, attempts)
        self.write(*self.ordered())
        self.say(f"[{c.index}/{self.n}] {c.name}: FAILED after {attempts} attempt(s): {self.failed[c.index]['reason']}")

    def ordered(self) -> tuple[list[dict], list[dict], list[dict]]:
        keys = sorted(self.entries)
        return ([self.entries[k] for k in keys], [r for k in keys for r in self.rows[k]],
                [self.failed[k] for k in sorted(self.failed)])


def _info(opts: ExecutorOptions, address: str, res: Resources, passes: int,
          timings: dict[str, float] | None = None) -> dict[str, Any]:
    return {"name": "ray", "address": address, "cpus_per_child": res.cpus, "gpus_per_child": res.gpus,
            "shards": opts.shards, "parent_passes": passes,
            "worker_seconds": {k: round(v, 3) for k, v in (timings or {}).items()}}


def _shard_settings(settings, units: list[str]) -> dict[str, Any]:
    return {**dataclasses.asdict(settings), "tasks": list(units)}


@dataclass
class Session:
    """A checked run folder and cache, a connected cluster and the resources per task."""

    opts: ExecutorOptions
    address: str
    res: Resources


def open_session(opts: ExecutorOptions, out: Path | None, cache, say: Callable[[str], None]) -> Session:
    """Before any work: Ray importable, --out and the cache writable, the cluster reached, the
    resources per task available there."""
    import_ray()
    check_folders(out, cache)
    address = connect(opts, say)
    return Session(opts, address, resources(opts))


def run_recipe_children(run, out: Path, session: Session, say: Callable[[str], None]):
    """Every child of a :class:`~flipcheck.recipes.runner.RecipeRun` (parent already scored) as Ray
    tasks: (entries, rows, failed, executor info)."""
    from flipcheck.evaluation.report import write_report
    from flipcheck.evaluation.runner import ModelRef

    opts, address, res = session.opts, session.address, session.res
    ev = run.evaluator
    recipe = run.recipe.model_copy(update={"parent": run.parent_src.spec})  # "demo" resolved: workers never train it
    base = {"recipe": recipe.model_dump(mode="json"), "cache_dir": str(run.cache.root), "out": str(out)}
    groups = split_units(list(ev.units), opts.shards)
    children: list[_Child] = []
    for i, spec in enumerate(run.children, 1):
        job = {**base, "child": spec.model_dump(mode="json"), "index": i}
        if len(groups) == 1:
            children.append(_Child(i, spec.name, first=("child", job)))
            continue

        def shard_jobs(result: dict | None, name: str = spec.name) -> list[dict]:
            return [{"settings": _shard_settings(ev.settings, g), "parent": run.parent_src.spec, "child": result["folder"],
                     "name": name, "cache_dir": str(run.cache.root), "out": str(out)} for g in groups]

        def merge(result: dict | None, name: str = spec.name) -> tuple[dict, list[dict]]:
            return ev.evaluate_child(ModelRef(name, result["folder"], info=result["info"],
                                              engine=ev.settings.engine_of("child")))

        children.append(_Child(i, spec.name, first=("compress", job), shard_jobs=shard_jobs, merge=merge))
    say(f"ray: {len(children)} children, {len(groups)} shard(s) each; {res.cpus:g} CPU / {res.gpus:g} GPU per task")
    passes = ev.parent_passes
    collect = _Collector(len(children), lambda e, r, f: write_report(
        out, finish_report(ev.report(e), f, _info(opts, address, res, passes)), r), say)
    worker_passes, timings = _drive(children, res, say, collect.done, collect.fail)
    entries, rows, failed = collect.ordered()
    return entries, rows, failed, _info(opts, address, res, passes + worker_passes, timings)


def evaluate_children(ev, refs: list, out, opts: ExecutorOptions):
    """Multi-child ``eval``: the parent scored here once, then every child's evaluation shards as
    Ray tasks, merged here from the cache: (entries, rows, failed, executor info)."""
    from flipcheck.evaluation.report import write_report

    say = lambda msg: log.info("%s", msg)  # noqa: E731
    out = Path(out) if out is not None else None
    session = open_session(opts, out, ev.cache, say)
    address, res = session.address, session.res
    say("scoring the parent (once, here)")
    ev.score_parent()
    groups = split_units(list(ev.units), opts.shards)
    parent = ev.parent.src().spec
    children: list[_Child] = []
    for i, ref in enumerate(refs, 1):
        jobs = [{"settings": _shard_settings(ev.settings, g), "parent": parent, "child": ref.src().spec,
                 "name": ref.name, "cache_dir": str(ev.cache.root), "out": str(out) if out else None} for g in groups]

        def merge(_result: dict | None, ref=ref) -> tuple[dict, list[dict]]:
            try:
                return ev.evaluate_child(ref)
            finally:
                ref.release()

        children.append(_Child(i, ref.name, shard_jobs=lambda _r, jobs=jobs: jobs, merge=merge))
    say(f"ray: {len(children)} children, {len(groups)} shard(s) each; {res.cpus:g} CPU / {res.gpus:g} GPU per task")
    passes = ev.parent_passes

    def write(e, r, f):
        if out is not None:
            write_report(out, finish_report(ev.report(e), f, _info(opts, address, res, passes)), r)

    collect = _Collector(len(children), write, say)
    worker_passes, timings = _drive(children, res, say, collect.done, collect.fail)
    entries, rows, failed = collect.ordered()
    return entries, rows, failed, _info(opts, address, res, passes + worker_passes, timings)
