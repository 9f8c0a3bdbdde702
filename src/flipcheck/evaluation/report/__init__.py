"""A run folder: report.json (versioned schema), samples.jsonl, report.md and report.html.

- :mod:`.schema`: the report dict (one builder, :func:`new_report` / :func:`child_entry`), reading
  and validating report.json and samples.jsonl;
- :mod:`.text`: figures as text, the headline sentences and the terminal table;
- :mod:`.markdown`, :mod:`.html` (with ``report.css``) and :mod:`.plots`: the two documents.

report.html is one self-contained file: inline CSS and PNG plots embedded as base64, no external
resources, so it can be mailed or attached to a CI run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flipcheck.evaluation.report.generations import write_plots
from flipcheck.evaluation.report.html import report_html
from flipcheck.evaluation.report.markdown import report_markdown
from flipcheck.evaluation.report.plots import flips_kl_points, plot_sweeps, sweep_groups
from flipcheck.evaluation.report.schema import (
    MAX_FLIPPED,
    REPORT_FILE,
    SAMPLES_FILE,
    SCHEMA,
    VERSION,
    child_entry,
    load_report,
    load_rows,
    new_report,
    validate,
)
from flipcheck.evaluation.report.text import headline, render_table, summary_line
from flipcheck.files import jsonable, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

__all__ = [
    "MAX_FLIPPED", "REPORT_FILE", "SAMPLES_FILE", "SCHEMA", "VERSION", "child_entry", "flips_kl_points", "headline",
    "load_report", "load_rows", "new_report", "plot_sweeps", "render_table", "report_html", "report_markdown",
    "summary_line", "sweep_groups", "write_report",
]


def write_report(folder: str | os.PathLike, report: Mapping[str, Any], rows: Iterable[Any]) -> Path:
    """Write report.json, samples.jsonl, report.md and report.html into `folder` (each atomically).

    `rows` are per-question rows (SampleRow dicts) each with a ``child`` field naming its child.
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rep = jsonable(report)
    validate(rep, folder / REPORT_FILE)
    row_dicts = [jsonable(r) for r in rows]
    write_json_atomic(folder / REPORT_FILE, rep)
    write_text_atomic(
        folder / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in row_dicts)
    )
    write_plots(folder, rep, row_dicts)  # the PNG files report.md links
    write_text_atomic(folder / "report.md", report_markdown(rep, row_dicts))
    write_text_atomic(folder / "report.html", report_html(rep, row_dicts))
    log.info("report written to %s", folder)
    return folder
