"""Task names and folders, resolved through lm-evaluation-harness.

flipcheck does not re-implement prompts: every task is an lm-eval task (``arc_easy``, ``mmlu``,
``gsm8k``, ...) or a task in a local folder passed as ``--include-path`` (lm-eval's own YAML format).
The packaged demo tasks are always included.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from flipcheck.errors import FlipcheckError, suggest

log = logging.getLogger(__name__)


def _include_paths(include_path: str | os.PathLike | list | None) -> tuple[str, ...]:
    paths: list[str] = []
    if include_path:
        items = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        for p in items:
            if not os.path.isdir(p):
                raise FlipcheckError(f"--include-path {str(p)!r} is not a folder of lm-eval task YAML files")
            paths.append(str(Path(p).resolve()))
    try:
        from flipcheck.demo import demo_task_dir

        paths.append(str(demo_task_dir()))
    except ImportError:  # pragma: no cover - the demo module ships with the package
        pass
    return tuple(paths)


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def task_manager(include_path: str | os.PathLike | list | None = None, tasks: list[str] | None = None):
    """An lm-eval TaskManager over the built-in tasks, the demo tasks and `include_path` (cached).

    Indexing lm-eval's thousands of built-in task files takes seconds; when every name in `tasks`
    is found in the local folders alone (the demo, a private task folder), those are all we index.
    """
    paths = _include_paths(include_path)
    if tasks:
        local = _task_manager(paths, False)
        known = set(local.all_tasks) | set(local.all_groups) | set(local.all_tags)
        if all(t in known for t in tasks):
            return local
    return _task_manager(paths, True)


def known_tasks(include_path=None) -> list[str]:
    """Every task, group and tag name lm-eval knows (with the include paths)."""
    tm = task_manager(include_path)
    return sorted(set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags))


def resolve_tasks(tasks: str | list[str], include_path=None) -> list[str]:
    """Split a comma list and check every name; unknown names fail with close suggestions."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise FlipcheckError("no tasks given; pass e.g. --tasks arc_easy,mmlu (see `flipcheck list --tasks`)")
    tm = task_manager(include_path, names)
    known = set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags)
    for n in names:
        if n not in known:
            hint = suggest(n, known) or " Run `flipcheck list --tasks` for the names lm-eval knows."
            where = " (or in --include-path folders)" if include_path else "; local task folders go in --include-path"
            raise FlipcheckError(f"unknown task {n!r}: lm-eval has no such task{where}.{hint}")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen
