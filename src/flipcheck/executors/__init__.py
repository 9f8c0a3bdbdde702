"""Where a run's children are made and scored: here, one after the other (``local``), or as tasks
on a Ray cluster (``ray``, :mod:`.ray_exec`; the worker side is :mod:`.work`, the split of a task
list into evaluation shards :mod:`.shards`).

Either way the driver scores the parent once, into the result cache; a child (or one evaluation
shard of it) is then one unit of work that reads the parent from that cache and writes its own
results there, so the merged report is the one a single process writes.

Exit codes of ``eval``/``run``/``sweep``: 0 done, 1 a gate budget exceeded, 2 bad input,
3 a child failed (after one retry; the report lists it with its reason), 130 interrupted.
"""

from __future__ import annotations

from flipcheck.executors.base import ChildPlan, Executor, Outcome, get_executor
from flipcheck.executors.options import (
    EXIT_CHILD_FAILED,
    ExecutorOptions,
    executor_names,
    executor_options,
    failed_children,
    failed_entry,
    finish_report,
    register_executor,
)

__all__ = ["EXIT_CHILD_FAILED", "ChildPlan", "Executor", "ExecutorOptions", "Outcome", "executor_names",
           "executor_options", "failed_children", "failed_entry", "finish_report", "get_executor", "register_executor"]
