"""report.json: the versioned schema, the one builder of report dicts, reading and validation.

report.json (``"schema": "flipcheck.report", "version": 2``)::

    {"schema", "version", "created", "flipcheck_version",
     "parent": {"source", "fingerprint", ...},
     "settings": {tasks, num_fewshot, limit, seed, batch_size, dtype, device, ...},
     "kl_method": {"name", "label", ...} | absent,
     "children": [{"name", "source", "fingerprint", "method", "settings",
                   "strength": {"sigma": 0.05} | null, "compression": [step reports],
                   "tasks": {task: summary}, "micro": summary, "macro": {...}}],
     "noise_floor": [{same shape as a child}, ...] | null}

Version 2 (issue: both KL directions, corpora, a calibrated floor): ``noise_floor`` is a list of
rows (another batch size, bf16-rounded weights, the other attention implementation; version 1 held
one entry), a child may carry ``"corpus": {name: figures}`` (distance on text, see
:func:`flipcheck.evaluation.corpus.summarize`) and summaries carry ``kl_options_rev`` /
``kl_vocab_rev`` (KL(C || P)). Version-1 reports are read as they are. Optional blocks besides:
``"failed"`` (children whose Ray task failed twice: name, status, reason, attempts), ``"executor"``
(where children ran, the parent's scoring passes), a child's ``"judge"`` section and the report's
``"judge_correlation"`` / ``"judge_run"`` (``flipcheck judge`` or a recipe's ``judge:``).

Task summaries are those of :func:`flipcheck.evaluation.samples.summarize_task` (a named group
holds its subtasks' summaries under ``"subtasks"``). Optional in a summary (added within version
2; absent from older reports and from ``micro``): ``"slices"`` (by subtask or category, prompt-length
tercile and parent-margin decile), ``"top_kl"`` (the questions with the largest KL) and
``"first_difference"`` (generative tasks). samples.jsonl holds one per-question row per
line (a :class:`~flipcheck.evaluation.samples.SampleRow` plus the ``child`` it belongs to).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flipcheck import __version__
from flipcheck.errors import FlipcheckError

SCHEMA = "flipcheck.report"


VERSION = 2


REPORT_FILE = "report.json"


SAMPLES_FILE = "samples.jsonl"


MAX_FLIPPED = 200  # flipped questions listed in report.md / report.html


def new_report(
    parent: Mapping[str, Any],
    settings: Mapping[str, Any],
    children: list[dict[str, Any]],
    noise_floor: list[dict[str, Any]] | None = None,
    *,
    kl_method: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict of the current schema version, stamped with the time and flipcheck version.

    The one builder of report dicts: ``flipcheck eval``/``sweep``/``run`` and ``flipcheck compare``
    all go through it, so their reports cannot drift apart.
    """
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "flipcheck_version": __version__,
        "parent": {"source": parent.get("source"), "fingerprint": parent.get("fingerprint"),
                   **{k: v for k, v in parent.items() if k not in ("source", "fingerprint")}},
        "settings": dict(settings),
        **({"kl_method": dict(kl_method)} if kl_method is not None else {}),
        "children": children,
        "noise_floor": noise_floor,
    }


def child_entry(
    name: str,
    tasks: Mapping[str, dict[str, Any]],
    *,
    micro: dict[str, Any] | None = None,
    macro: dict[str, Any] | None = None,
    source: str | None = None,
    fingerprint: str | None = None,
    method: str | None = None,
    settings: dict[str, Any] | None = None,
    strength: dict[str, float] | None = None,
    compression: list[dict[str, Any]] | None = None,
    kl_method: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of ``children`` (or the ``noise_floor``)."""
    return {
        "name": name,
        "source": source,
        "fingerprint": fingerprint,
        "method": method,
        "settings": settings,
        "strength": strength,
        "compression": compression or [],
        **({"kl_method": dict(kl_method)} if kl_method is not None else {}),
        "tasks": dict(tasks),
        "micro": micro,
        "macro": macro,
    }


def validate(data: Any, path: Any) -> None:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise FlipcheckError(f"{path} is not a flipcheck report (no \"schema\": \"{SCHEMA}\")")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FlipcheckError(f"{path} is not a flipcheck report (its version is {version!r}, not an integer)")
    if version > VERSION:
        raise FlipcheckError(
            f"{path} was written by a newer flipcheck (report version {version}); this one reads version {VERSION}: upgrade flipcheck"
        )
    if not isinstance(data.get("children"), list):
        raise FlipcheckError(f"{path} is not a flipcheck report (no list of children)")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate report.json (or the run folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_FILE
    if not p.is_file():
        raise FlipcheckError(f"{p}: no such report file (expected report.json or the run folder holding it)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise FlipcheckError(f"{p} is not a flipcheck report (not JSON: {str(err).splitlines()[0]})") from err
    validate(data, p)
    return data


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-question rows of a run folder (its samples.jsonl)."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
    if not p.is_file():
        raise FlipcheckError(f"{p}: no such samples file")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
