"""Compare two lm-eval runs that already exist, from their ``--log_samples`` files.

    lm_eval ... --log_samples --output_path runs/parent   ->  samples_<task>_<timestamp>.jsonl
    flipcheck compare runs/parent/.../samples_arc_easy_*.jsonl runs/child/.../samples_arc_easy_*.jsonl

Flips, answer changes, accuracy with its paired bootstrap interval, KL over the options and the
parent's top margins come from the log-likelihoods lm-eval stored per option; nothing is re-run.
KL over the vocabulary needs the models' full distributions, which lm-eval does not log, so it is
absent here (use ``flipcheck eval`` for it). Two folders may be given instead of two files: every
task found in both is compared (the newest file per task).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.report import child_entry, new_report, write_report
from flipcheck.evaluation.samples import SampleRow, aggregate, build_rows, set_headline, summarize_task

log = logging.getLogger(__name__)

_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<stamp>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.jsonl$")
_REQUIRED = ("doc_id", "arguments")


def task_from_filename(path: str | os.PathLike) -> str | None:
    """'samples_arc_easy_2024-05-01T12-00-00.123456.jsonl' -> 'arc_easy'; None if not of that form."""
    m = _NAME.match(Path(path).name)
    return m.group("task") if m else None


def read_samples_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-sample records of one lm-eval ``--log_samples`` JSONL file, checked for its shape."""
    p = Path(path)
    if not p.exists():
        raise FlipcheckError(f"{p}: no such file")
    if p.is_dir():
        raise FlipcheckError(f"{p} is a folder; pass an lm-eval samples_<task>_<time>.jsonl file (or two folders)")
    out: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                raise FlipcheckError(f"{p} is not an lm-eval samples file (line {i} is not JSON)") from err
            if not isinstance(rec, dict) or any(k not in rec for k in _REQUIRED) or not (
                "filtered_resps" in rec or "resps" in rec
            ):
                raise FlipcheckError(
                    f"{p} is not an lm-eval samples file (line {i} lacks doc_id/arguments/resps; "
                    "write one with lm_eval --log_samples)"
                )
            out.append(rec)
    if not out:
        raise FlipcheckError(f"{p} is not an lm-eval samples file (it is empty)")
    return out


def _task_name(parent: Path, child: Path, task: str | None) -> str:
    if task:
        return task
    tp, tc = task_from_filename(parent), task_from_filename(child)
    if tp is None or tc is None:
        bad = parent if tp is None else child
        raise FlipcheckError(
            f"cannot tell the task from the file name {bad.name!r} (expected samples_<task>_<time>.jsonl); pass --task"
        )
    if tp != tc:
        raise FlipcheckError(f"the files hold different tasks: {tp!r} (parent) and {tc!r} (child)")
    return tp


def compare_rows(
    parent_file: str | os.PathLike,
    child_file: str | os.PathLike,
    *,
    task: str | None = None,
    filter_name: str | None = None,
) -> tuple[str, list[SampleRow]]:
    """(task, per-question rows) for one pair of samples files."""
    pf, cf = Path(parent_file), Path(child_file)
    parent, child = read_samples_file(pf), read_samples_file(cf)
    name = _task_name(pf, cf, task)
    return name, build_rows(name, parent, child, filter_name=filter_name)


def _newest_by_task(folder: Path) -> dict[str, Path]:
    found: dict[str, tuple[str, Path]] = {}
    for f in folder.rglob("samples_*.jsonl"):
        m = _NAME.match(f.name)
        if m and (m.group("task") not in found or m.group("stamp") > found[m.group("task")][0]):
            found[m.group("task")] = (m.group("stamp"), f)
    return {t: v[1] for t, v in found.items()}


def _pairs(parent: Path, child: Path, task: str | None) -> list[tuple[Path, Path, str | None]]:
    if parent.is_dir() != child.is_dir():
        raise FlipcheckError(f"pass two samples files or two folders, not a mix ({parent}, {child})")
    if not parent.is_dir():
        return [(parent, child, task)]
    p, c = _newest_by_task(parent), _newest_by_task(child)
    if not p:
        raise FlipcheckError(f"{parent}: no lm-eval samples_<task>_<time>.jsonl files in this folder")
    common = sorted(set(p) & set(c))
    if task:
        if task not in common:
            raise FlipcheckError(f"task {task!r} is not in both folders; tasks in both: {', '.join(common) or 'none'}")
        common = [task]
    if not common:
        raise FlipcheckError(f"{parent} and {child} have no task in common (parent: {', '.join(sorted(p))})")
    for t in sorted(set(p) ^ set(c)):
        log.warning("task %s is in only one of the folders; skipped", t)
    return [(p[t], c[t], t) for t in common]


def _child_name(parent: Path, child: Path) -> str:
    """lm-eval writes into <output_path>/<model name>/: that folder names the child when it differs."""
    if child.is_dir():
        return child.name
    return child.parent.name if child.parent.name != parent.parent.name else child.stem


def compare(
    parent_file: str | os.PathLike,
    child_file: str | os.PathLike,
    *,
    task: str | None = None,
    out: str | os.PathLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    filter_name: str | None = None,
    name: str | None = None,
    metric: str | None = None,
) -> dict[str, Any]:
    """Compare a child's lm-eval samples with the parent's; returns a flipcheck report dict.

    `parent_file`/`child_file` are ``--log_samples`` JSONL files of one task (the task name comes
    from the file name, or `task`), or two output folders (every task in both). The report has one
    child whose ``tasks`` hold the figures of :func:`~flipcheck.evaluation.samples.summarize_task`
    (no vocabulary KL). With `out`, report.json, samples.jsonl, report.md and report.html are
    written there.
    """
    pf, cf = Path(parent_file), Path(child_file)
    for p in (pf, cf):
        if not p.exists():
            raise FlipcheckError(f"{p}: no such file")
    summaries: dict[str, dict[str, Any]] = {}
    rows_by_task: dict[str, list[SampleRow]] = {}
    for p, c, t in _pairs(pf, cf, task):
        tname, rows = compare_rows(p, c, task=t, filter_name=filter_name)
        rows_by_task[tname] = rows
        set_headline(rows, metric, tname)  # acc_norm where the samples carry it, unless metric says otherwise
        summaries[tname] = summarize_task(rows, n_boot=n_boot, seed=seed)
    agg = aggregate(summaries, rows_by_task, n_boot=n_boot, seed=seed)
    child_name = name or _child_name(pf, cf)
    entry = child_entry(child_name, summaries, micro=agg["micro"], macro=agg["macro"], source=str(cf))
    report = new_report(
        {"source": str(pf), "fingerprint": None},
        {"source": "lm-eval --log_samples", "tasks": sorted(summaries), "filter": filter_name, "metric": metric,
         "n_boot": n_boot, "seed": seed},
        [entry],
    )
    if out is not None:
        rows = [{"child": child_name, **r.to_dict()} for t in rows_by_task for r in rows_by_task[t]]
        write_report(out, report, rows)
    return report
