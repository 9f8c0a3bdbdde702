"""Task names and folders, resolved through lm-evaluation-harness.

flipcheck does not re-implement prompts: every task is an lm-eval task (``arc_easy``, ``mmlu``,
``gsm8k``, ...) or a task in a local folder passed as ``--include-path`` (lm-eval's own YAML format).
The packaged demo tasks are always included.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError, suggest
from flipcheck.files import packaged_task_dir  # noqa: F401 - always on the include path; imported from here too

log = logging.getLogger(__name__)


def _include_paths(include_path: str | os.PathLike | list | None) -> tuple[str, ...]:
    paths: list[str] = []
    if include_path:
        items = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        for p in items:
            if not os.path.isdir(p):
                raise FlipcheckError(f"--include-path {str(p)!r} is not a folder of lm-eval task YAML files")
            paths.append(str(Path(p).resolve()))
    paths.append(str(packaged_task_dir()))
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


@dataclass
class TaskNode:
    """A task as lm-eval arranges it: a leaf task, or a group of them (a tag is not a container).

    ``weight_by_size``: how the group's ``aggregate_metric_list`` weighs its members (True: by their
    number of questions, lm-eval's default; False: each member alike); None for a group that
    lists no aggregate metric (flipcheck pools its questions). ``filters``: a leaf's filter names.
    """

    name: str
    kind: str  # "group", "task" or "tag"
    children: list[TaskNode] = field(default_factory=list)
    weight_by_size: bool | None = None
    filters: list[str] | None = field(default_factory=lambda: ["none"])

    def leaves(self) -> list[TaskNode]:
        if self.kind == "task":
            return [self]
        return [leaf for c in self.children for leaf in c.leaves()]


def _weight_by_size(cfg: Mapping[str, Any]) -> bool | None:
    agg = cfg.get("aggregate_metric_list")
    if isinstance(agg, Mapping):
        agg = [agg]
    if not isinstance(agg, list) or not agg:
        return None
    first = next((a for a in agg if isinstance(a, Mapping) and a.get("metric") in ("acc", "acc_norm")), agg[0])
    return bool(first.get("weight_by_size", True)) if isinstance(first, Mapping) else None


def _filters(cfg: Mapping[str, Any] | None) -> list[str]:
    fl = (cfg or {}).get("filter_list")
    names = [str(f.get("name")) for f in fl if isinstance(f, Mapping) and f.get("name")] if isinstance(fl, list) else []
    return names or ["none"]


def _node(tm, name: str, cfg: Mapping[str, Any] | None = None, depth: int = 0) -> TaskNode:
    """The tree under `name`, read from lm-eval's task index (no dataset is loaded)."""
    entry = tm.task_index.get(name) if cfg is None else None
    kind = getattr(getattr(entry, "kind", None), "name", "").lower()
    if cfg is None and kind == "tag":
        members = sorted(getattr(entry, "tags", ()) or ())
        return TaskNode(name, "tag", [_node(tm, m, depth=depth + 1) for m in members])
    cfg = cfg if cfg is not None else (getattr(entry, "cfg", None) or {})
    if "group" not in cfg or depth > 20:  # a Python task's filters are not in its YAML: unknown (None)
        return TaskNode(name, "task", filters=None if kind == "py_task" or "class" in cfg else _filters(cfg))
    node = TaskNode(name, "group", weight_by_size=_weight_by_size(cfg))
    for item in cfg.get("task") or []:
        if isinstance(item, str):
            node.children.append(_member(tm, item, name, {}, depth))
        elif isinstance(item, Mapping) and "group" in item:
            sub = str(item["group"])
            known = tm.task_index.get(sub)
            node.children.append(_node(tm, sub, None if known else item, depth + 1))
            if not known:
                node.children[-1].name = f"{name}::{sub}"
        elif isinstance(item, Mapping) and "task" in item:
            node.children.append(_member(tm, str(item["task"]), name, item, depth))
    return node


def _member(tm, base: str, group: str, overrides: Mapping[str, Any], depth: int) -> TaskNode:
    if tm.task_index.get(base) is None:  # an inline task, named group::task by lm-eval
        return TaskNode(f"{group}::{base}", "task", filters=_filters(overrides))
    node = _node(tm, base, depth=depth + 1)
    if "filter_list" in overrides and node.kind == "task" and node.filters is not None:
        node.filters = _filters(overrides)
    return node


def task_tree(name: str, include_path=None) -> TaskNode:
    """How lm-eval arranges a task, group or tag name (for aggregation as lm-eval aggregates)."""
    tm = task_manager(include_path, [name])
    try:
        return _node(tm, name)
    except (AttributeError, TypeError, ValueError) as err:  # an index shape this lm-eval does not have
        log.debug("%s: cannot read its group structure (%s); its subtasks are pooled", name, err)
        return TaskNode(name, "group")


def leaf_weights(node: TaskNode, sizes: Mapping[str, int]) -> dict[str, float] | None:
    """Each leaf's share of a group's figures, following every level's aggregate_metric_list.

    A level weighted by size (or without an aggregate) gives each member its share of the questions;
    an unweighted level gives each member with questions an equal share. None when a task in
    `sizes` is not among the group's leaves (the caller then pools).
    """

    def size(n: TaskNode) -> int:
        return int(sizes.get(n.name, 0)) if n.kind == "task" else sum(size(c) for c in n.children)

    out: dict[str, float] = {}

    def walk(n: TaskNode, w: float) -> None:
        if n.kind == "task":
            out[n.name] = out.get(n.name, 0.0) + w
            return
        kids = [c for c in n.children if size(c) > 0]
        for c in kids:
            walk(c, w * (1.0 / len(kids) if n.weight_by_size is False else size(c) / size(n)))

    if size(node):
        walk(node, 1.0)
    return out if set(sizes) <= set(out) else None


def check_filter(trees: list[TaskNode], filter_name: str | None) -> None:
    """Refuse, before any model runs, a --filter that no task has or that a task with several filters lacks."""
    if filter_name is None:
        return
    leaves = [leaf for t in trees for leaf in t.leaves()]
    known = {leaf.name: leaf.filters for leaf in leaves if leaf.filters}
    if len(known) < len(leaves) and not any(filter_name in fs for fs in known.values()):
        known = {n: fs for n, fs in known.items() if len(fs) > 1}  # a task of unknown filters may have it
    lacking = [n for n, fs in known.items() if filter_name not in fs and len(fs) > 1]
    if lacking or (known and not any(filter_name in fs for fs in known.values())):
        shown = lacking or list(known)
        names = "; ".join(f"{n}: {', '.join(known[n])}" for n in shown[:4]) + ("; ..." if len(shown) > 4 else "")
        raise FlipcheckError(f"--filter {filter_name!r}: not a filter of {shown[0]!r} (filters: {names})")
