"""report.md: a line per child, the table per child and task, subtasks folded, slices, the flipped questions."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from typing import Any

from flipcheck.evaluation.report.corpus import corpus_markdown
from flipcheck.evaluation.report.generations import generations_markdown
from flipcheck.evaluation.report.schema import MAX_FLIPPED
from flipcheck.evaluation.report.sections import markdown_sections
from flipcheck.evaluation.report.slices import slices_markdown
from flipcheck.evaluation.report.text import (
    EXPLAIN,
    HEADERS,
    answer_text,
    describe,
    engines_label,
    failed_notes,
    flip_direction,
    flipped_rows,
    gold_text,
    group_note,
    group_rows,
    has_questions,
    headline,
    kl_method_label,
    labelled_entries,
    labelled_summaries,
    nonfinite_notes,
    overall_summary,
    settings_items,
    settings_line,
    summary_line,
    table_cells,
)


def _md_escape(text: str) -> str:
    """Text shown as itself in Markdown prose: a child named __tmp__model is not bold.

    Underscores inside a word (group_size) are left alone, as GitHub's Markdown leaves them.
    """
    text = re.sub(r"([\\`*\[\]<>|])", r"\\\1", text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)


def report_markdown(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """report.md: a line per child, the table per child and task, and the flipped questions."""
    rows = list(rows)
    parent = report.get("parent") or {}
    out = [
        "# flipcheck report",
        "",
        f"- parent: `{parent.get('source')}` (fingerprint `{parent.get('fingerprint')}`)",
        *([f"- settings: {settings_line(report)}"] if settings_items(report) else []),
        *([f"- vocabulary KL: {kl_method_label(report)}"] if kl_method_label(report) else []),
        *([f"- engines: {_md_escape(engines_label(report))}"] if engines_label(report) else []),
        *[f"- **{_md_escape(note)}**" for note in nonfinite_notes(report)],
        *[f"- **{_md_escape(note)}**" for note in failed_notes(report)],
        f"- created: {report.get('created')} by flipcheck {report.get('flipcheck_version')}",
    ]
    lead = summary_line(report)
    glance = [(label, entry, headline(overall_summary(entry))) for label, entry in labelled_entries(report)]
    if lead or any(h for _, _, h in glance):
        out += ["", "## At a glance", ""]
        if lead:
            out += [lead, ""]
        for label, entry, line in glance:
            what = describe(entry)
            if line or what:
                out.append(f"- **{_md_escape(label)}**" + (f" ({_md_escape(what)})" if what else "")
                           + (f": {line}" if line else ""))
    questions = has_questions(report)
    if questions:
        out += [
            "",
            "## Per task",
            "",
            EXPLAIN,
            "",
            "| " + " | ".join(HEADERS) + " |",
            "|" + "---|" * len(HEADERS),
        ]
        for label, entry in labelled_entries(report):
            for task, s in labelled_summaries(entry, detail=True):
                cells = [label, task, str(s.get("n", "-")), *table_cells(s)]
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out += _subtasks_markdown(report)
    if questions:
        out += slices_markdown(report)
    out += generations_markdown(report)
    out += corpus_markdown(report)
    out += markdown_sections(report)  # the judge's, where the report has one
    if questions:
        out += _flipped_markdown(rows)
    return "\n".join(out) + "\n"


def _flipped_markdown(rows: list[Mapping[str, Any]]) -> list[str]:
    flipped = flipped_rows(rows)
    out = ["", f"## Flipped questions ({len(flipped)}" + (f", first {MAX_FLIPPED}" if len(flipped) > MAX_FLIPPED else "") + ")",
           ""]
    if flipped:
        out += ["✓ / ✗: the answer was right / wrong. c→i: the parent was right and the child is wrong; i→c: the "
                "reverse.", "", "| child | task | doc_id | gold | parent answer | child answer | flip | question (end of prompt) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in flipped[:MAX_FLIPPED]:
            question = " ".join(str(r.get("question") or "").split())
            cells = [str(r.get("child", "")), str(r.get("task")), str(r.get("doc_id")), gold_text(r),
                     answer_text(r, "P"), answer_text(r, "C"), flip_direction(r), ("…" if len(question) > 100 else "") + question[-100:]]
            out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    else:
        out.append("None.")
    return out


def _subtasks_markdown(report: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for label, group, s in group_rows(report):
        out += ["", f"<details><summary>{html.escape(label)} / {html.escape(group)}: {group_note(s)}</summary>", "",
                "| " + " | ".join(HEADERS[1:]) + " |", "|" + "---|" * (len(HEADERS) - 1)]
        for task, sub in labelled_summaries({"tasks": s["subtasks"]}, detail=True):
            cells = [task, str(sub.get("n", "-")), *table_cells(sub)]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out += ["", "</details>"]
    return out
