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

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.executors.base import ChildPlan, Collector, Job, Outcome, Say
from flipcheck.executors.options import ExecutorOptions
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


def check_folders(out: Path | None, cache_root: Path | None) -> None:
    """--out and the cache must be writable here; --out gets the probe a worker looks for."""
    if cache_root is None:
        raise FlipcheckError("--executor ray needs the result cache (workers read the parent from it): drop --no-cache")
    for what, folder in (("--cache-dir", Path(cache_root)), ("--out", out)):
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
    plan: ChildPlan
    stage: str = "shards"
    result: dict | None = None
    shards_left: int = 0
    failed: bool = False
    refs: list = field(default_factory=list)


def _info(session: Session, counts: dict[str, int], timings: dict[str, float]) -> dict[str, Any]:
    res = session.res
    return {"name": "ray", "address": session.address, "cpus_per_child": res.cpus, "gpus_per_child": res.gpus,
            "shards": session.opts.shards, "counts": dict(counts),
            "worker_seconds": {k: round(v, 3) for k, v in timings.items()}}


@dataclass
class Session:
    """A checked run folder and cache, a connected cluster and the resources per task."""

    opts: ExecutorOptions
    address: str
    res: Resources


def open_session(opts: ExecutorOptions, out: Path | None, cache_root: Path | None, say: Say) -> Session:
    """Before any work: Ray importable, --out and the cache writable, the cluster reached, the
    resources per task available there."""
    import_ray()
    check_folders(out, cache_root)
    address = connect(opts, say)
    return Session(opts, address, resources(opts))


def _reason(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip()
    first = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if isinstance(err, FlipcheckError):
        return first or "error"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _kind(job: Job) -> str:
    """A job's short name: its function's (``child``, ``compress``, ``shard``)."""
    return job[0].rpartition(":")[2]


class _Driver:
    """The driver's state while the plans run: the Ray tasks in flight (ref -> child, job, attempt),
    and the jobs' summed ``counts`` and phase seconds."""

    def __init__(self, plans: list[ChildPlan], session: Session, say: Say, collect: Collector, remote):
        self.plans, self.session, self.say, self.collect, self.remote = plans, session, say, collect, remote
        self.pending: dict[Any, tuple[_Child, Job, int]] = {}
        self.counts: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.children = [_Child(p) for p in plans]

    def submit(self, c: _Child, job: Job, attempt: int = 1) -> None:
        res = self.session.res
        fn, values = job
        ref = self.remote.options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0,
                                  name=f"flipcheck-{_kind(job)}-{c.plan.name}").remote(
            fn, {**values, "threads": res.threads})
        self.pending[ref] = (c, job, attempt)
        c.refs.append(ref)

    def start(self, c: _Child) -> None:
        """A child's first job (the compression, where it has one), else its evaluation shards."""
        if c.plan.first is not None:
            c.stage = "first"
            self.submit(c, c.plan.first)
        else:
            self.start_shards(c, None)

    def start_shards(self, c: _Child, result: dict | None) -> None:
        c.result = result
        jobs = c.plan.shard_jobs(result)
        c.shards_left = len(jobs)
        for job in jobs:
            self.submit(c, job)

    def fail(self, c: _Child, reason: str, attempts: int) -> None:
        import ray

        c.failed = True
        for ref in c.refs:
            if ref in self.pending:
                ray.cancel(ref, force=True)
        self.collect.fail(c.plan, reason, attempts)

    def retry_or_fail(self, c: _Child, job: Job, attempt: int, err: BaseException) -> None:
        """A task raised or its worker died: submit it once more, else fail the child."""
        reason = _reason(err)
        if attempt < ATTEMPTS:
            self.say(f"[{c.plan.index}] {c.plan.name}: {_kind(job)} task failed ({reason}); retrying once")
            self.submit(c, job, attempt + 1)
        else:
            self.fail(c, reason, attempt)

    def finished(self, c: _Child, entry: dict, rows: list[dict]) -> None:
        self.collect.done(c.plan, entry, rows)
        self.say(f"[{c.plan.index}/{len(self.plans)}] {c.plan.name}: done")

    def record(self, out: dict) -> None:
        for name, n in (out.get("counts") or {}).items():
            self.counts[name] = self.counts.get(name, 0) + int(n)
        for phase, seconds in (out.get("timings") or {}).items():
            self.timings[phase] = self.timings.get(phase, 0.0) + float(seconds)

    def advance(self, c: _Child, out: dict) -> None:
        """A task of `c` returned `out`: after its first job start the shards (or finish); after its
        last shard merge them (a failing merge fails this child only)."""
        self.record(out)
        self.collect.info = _info(self.session, self.counts, self.timings)
        if c.stage == "first":
            c.stage = "shards"
            if "entry" in out:
                self.finished(c, out["entry"], out["rows"])
            else:
                self.start_shards(c, out)
            return
        c.shards_left -= 1
        if c.shards_left == 0:
            try:
                entry, rows = c.plan.merge(c.result)
            except Exception as err:  # the merge runs here: a failure of it fails this child only
                self.fail(c, _reason(err), 1)
                return
            self.finished(c, entry, rows)


def run_plans(plans: list[ChildPlan], session: Session, say: Say, collect: Collector) -> Outcome:
    """Run every plan's jobs to completion (or failure), each as a Ray task; a failed task is
    submitted once more. The outcome's info: the cluster, the resources per task, the jobs' summed
    ``counts`` and the seconds of each phase summed over the workers' tasks."""
    import ray

    res = session.res
    run = _Driver(plans, session, say, collect, ray.remote(run_job))
    for c in run.children:
        run.start(c)
    collect.info = _info(session, {}, {})
    say(f"ray: {len(plans)} children, {session.opts.shards} shard(s) each; {res.cpus:g} CPU / {res.gpus:g} GPU per task")
    pending = run.pending
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C through
            if not ready:
                continue
            c, job, attempt = pending.pop(ready[0])
            if c.failed:
                continue
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                run.retry_or_fail(c, job, attempt, err)
                continue
            run.advance(c, out)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        say(f"interrupted: cancelled {len(pending)} running Ray task(s); finished children are kept")
        raise
    collect.info = _info(session, run.counts, run.timings)
    return collect.outcome()
