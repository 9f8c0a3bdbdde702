"""Evaluation shards: one child's task list cut into groups, each scored as its own unit of work.

A shard is a list of whole tasks (units as the user named them: a task, a group such as ``mmlu``,
or each task of a tag). Every (child, unit) result is a cache entry keyed without the task list,
so shards write the very entries a single process would, and the merge reads them back.
Splitting one task by document ranges is not done: lm-eval's ``limit`` takes the first N
documents only, so a range would need its own instance selection.
"""

from __future__ import annotations


def split_units(units: list[str], shards: int) -> list[list[str]]:
    """`units` dealt round-robin into at most `shards` non-empty groups, order kept within each.

    >>> split_units(["a", "b", "c"], 2)
    [['a', 'c'], ['b']]
    """
    n = max(1, min(shards, len(units)))
    groups: list[list[str]] = [[] for _ in range(n)]
    for i, unit in enumerate(units):
        groups[i % n].append(unit)
    return [g for g in groups if g]
