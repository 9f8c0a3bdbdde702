"""The executor interface: where a run's children are made and scored.

An executor runs :class:`ChildPlan` s that the orchestration (:mod:`flipcheck.orchestrate`) builds:
each plan says how to make and score one child in this process (``here``) and, for executors
that run elsewhere, as plain jobs (a job function named ``"module:function"`` and a dict of
JSON-like values, never a model). The executor knows nothing of what a child is: it calls
``on_done`` on the driver as each child finishes (in any order), keeps the finished children in
the plans' order and hands the whole :class:`Outcome` to ``on_progress`` after every change, so
the caller can rewrite its report and Ctrl-C keeps every finished child. ``local`` runs the plans
one after the other here; ``ray`` (:mod:`.ray_exec`) as tasks on a cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.executors.options import _EXECUTORS, ExecutorOptions, failed_entry, register_executor

Say = Callable[[str], None]
Job = tuple[str, dict]  # ("module:function", job values)


@dataclass
class ChildPlan:
    """One child: ``here`` makes and scores it in this process -> (report entry, rows). A remote
    executor runs ``first`` (a job whose result may carry ``entry`` and ``rows``; else it is passed
    to ``shard_jobs``), then every shard job, then ``merge`` (here) -> (entry, rows)."""

    index: int
    name: str
    here: Callable[[], tuple[dict, list[dict]]]
    first: Job | None = None
    shard_jobs: Callable[[dict | None], list[Job]] | None = None
    merge: Callable[[dict | None], tuple[dict, list[dict]]] | None = None


@dataclass
class Outcome:
    entries: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


OnDone = Callable[[ChildPlan, dict, list[dict]], None]
OnProgress = Callable[[Outcome], None]


class Collector:
    """Finished and failed children in the plans' order; `on_progress` called after each."""

    def __init__(self, plans: list[ChildPlan], on_done: OnDone | None, on_progress: OnProgress | None, say: Say):
        self.n, self.on_done, self.on_progress, self.say = len(plans), on_done, on_progress, say
        self.entries: dict[int, dict] = {}
        self.rows: dict[int, list[dict]] = {}
        self.failed: dict[int, dict] = {}
        self.info: dict[str, Any] = {}

    def done(self, plan: ChildPlan, entry: dict, rows: list[dict]) -> None:
        if self.on_done is not None:
            self.on_done(plan, entry, rows)
        self.entries[plan.index], self.rows[plan.index] = entry, rows
        self._progress()  # on disk before anything else can happen (Ctrl-C included)

    def fail(self, plan: ChildPlan, reason: str, attempts: int) -> None:
        self.failed[plan.index] = failed_entry(plan.name, reason, attempts)
        self._progress()
        self.say(f"[{plan.index}/{self.n}] {plan.name}: FAILED after {attempts} attempt(s): "
                 f"{self.failed[plan.index]['reason']}")

    def outcome(self) -> Outcome:
        keys = sorted(self.entries)
        return Outcome([self.entries[k] for k in keys], [r for k in keys for r in self.rows[k]],
                       [self.failed[k] for k in sorted(self.failed)], dict(self.info))

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.outcome())


class Executor(ABC):
    name = "?"
    remote = False  # True: children run elsewhere and read the parent from the shared cache

    def open(self, out: Path | None, cache_root: Path | None, say: Say) -> None:  # noqa: B027 - optional preflight
        """Before any work: whatever can fail cheaply (a cluster to reach, folders to check).
        `cache_root`: the result cache's folder, None when caching is off."""

    @abstractmethod
    def run(self, plans: list[ChildPlan], say: Say, *, on_done: OnDone | None = None,
            on_progress: OnProgress | None = None) -> Outcome:
        """Run every plan; the outcome's ``info`` says how (its ``counts`` sum the jobs' own)."""


class LocalExecutor(Executor):
    """One child after the other, here; finished children are kept as they finish."""

    name = "local"

    def __init__(self, options: ExecutorOptions | None = None) -> None:
        self.options = options

    def run(self, plans: list[ChildPlan], say: Say, *, on_done: OnDone | None = None,
            on_progress: OnProgress | None = None) -> Outcome:
        collect = Collector(plans, on_done, on_progress, say)
        collect.info = {"name": self.name}
        for plan in plans:
            collect.done(plan, *plan.here())
        return collect.outcome()


class RayExecutor(Executor):
    """Each child (or each evaluation shard of it) as a Ray task (:mod:`.ray_exec`)."""

    name = "ray"
    remote = True

    def __init__(self, options: ExecutorOptions) -> None:
        self.options = options
        self.session = None

    def open(self, out: Path | None, cache_root: Path | None, say: Say) -> None:
        from flipcheck.executors.ray_exec import check_folders, open_session

        if self.session is None:
            self.session = open_session(self.options, out, cache_root, say)
        else:  # connected already: this run folder gets the probe its workers look for
            check_folders(out, cache_root)

    def run(self, plans: list[ChildPlan], say: Say, *, on_done: OnDone | None = None,
            on_progress: OnProgress | None = None) -> Outcome:
        from flipcheck.executors.ray_exec import run_plans

        if self.session is None:
            raise RuntimeError("RayExecutor.run before open()")
        return run_plans(plans, self.session, say, Collector(plans, on_done, on_progress, say))


def get_executor(options: ExecutorOptions | None = None) -> Executor:
    """The executor for :class:`~flipcheck.executors.ExecutorOptions` (None: local)."""
    options = options or ExecutorOptions()
    return _EXECUTORS[options.name](options)


register_executor("local", LocalExecutor)
register_executor("ray", RayExecutor)
