"""report.html: one self-contained page (inline CSS, base64 PNG plots, no external resources, no script)."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

from flipcheck.evaluation.report.corpus import corpus_html
from flipcheck.evaluation.report.generations import generations_html
from flipcheck.evaluation.report.plots import _CAPTIONS, FLOOR_COLOUR, PLOTS, child_colours
from flipcheck.evaluation.report.schema import MAX_FLIPPED
from flipcheck.evaluation.report.sections import html_sections
from flipcheck.evaluation.report.slices import slices_html
from flipcheck.evaluation.report.text import (
    EXPLAIN,
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
    is_floor,
    kl_method_label,
    labelled_entries,
    labelled_summaries,
    mean_of,
    nonfinite_notes,
    overall_summary,
    pts_text,
    settings_items,
    side_value,
    signed,
    summary_line,
    table_cells,
)
from flipcheck.files import pct

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def css() -> str:
    """The page's style sheet (report.css, package data)."""
    return resources.files("flipcheck.evaluation.report").joinpath("report.css").read_text(encoding="utf-8")


def _card(label: str, entry: Mapping[str, Any], colour: str, scale: float) -> str:
    e = html.escape
    s = overall_summary(entry) or {}
    floor = is_floor(label)
    delta, flips = s.get("delta_acc"), s.get("flips")
    big = [f"<div><b>{e(pts_text(delta).replace(' pts', ''))}</b><span>accuracy, points</span></div>",
           f"<div><b>{e(pct(flips))}</b><span>of answers flipped</span></div>"]
    extra = [f"{name} {fmt(v)}" for name, v, fmt in (
        ("KL options", mean_of(s.get("kl_options")), lambda v: f"{v:.3g}"),
        ("KL vocab", mean_of(s.get("kl_vocab")), lambda v: f"{v:.3g}"),
        ("top-1", s.get("top1_agree"), pct),
    ) if v is not None]
    bars = ""
    if delta is not None and flips is not None:
        w_acc, w_flip = (100 * min(1.0, abs(v) / scale) for v in (delta, flips))
        bars = (f'<div class="bar">|Δacc|<span class="track"><span class="fill acc" style="width:{w_acc:.1f}%">'
                f'</span></span></div><div class="bar">flips<span class="track"><span class="fill flip" '
                f'style="width:{w_flip:.1f}%"></span></span></div>')
    line = headline(s)
    n = s.get("n")
    return (
        f'<div class="card{" floor" if floor else ""}" style="--c:{colour}">'
        f'<div class="name">{e(label)}</div><div class="what">{e(describe(entry)) or "&nbsp;"}</div>'
        f'<div class="big">{"".join(big)}</div>{bars}'
        + (f'<div class="what">{e(" · ".join(extra))}</div>' if extra else "")
        + (f"<p>{e(line[0].upper() + line[1:])}" + (f" ({n} questions)." if n else ".") + "</p>" if line else "")
        + "</div>"
    )


def _subtasks_html(report: Mapping[str, Any], colours: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for label, group, s in group_rows(report):
        out.append(f"<details><summary>{html.escape(label)} / {html.escape(group)}: {group_note(s)}</summary>")
        out += _summary_table({"children": [{"name": label, "tasks": s["subtasks"]}]}, colours)
        out.append("</details>")
    return out


def _summary_table(report: Mapping[str, Any], colours: Mapping[str, str]) -> list[str]:
    e = html.escape
    heads = ["child", "task", "n", "acc P", "acc C", "Δacc (pts)", "flips", "answer changes", "KL options",
             "KL vocab", "top-1 agree"]
    out = ['<table class="summary"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead>"]
    flip_max = max([s.get("flips") or 0.0 for _, en in labelled_entries(report) for _, s in labelled_summaries(en)] + [1e-12])
    for label, entry in labelled_entries(report):
        summaries = labelled_summaries(entry, detail=True)
        if not summaries:
            continue
        out.append('<tbody class="floor">' if is_floor(label) else "<tbody>")
        for j, (task, s) in enumerate(summaries):
            cells = []
            if j == 0:
                cells.append(f'<td class="child" rowspan="{len(summaries)}" style="--c:{colours.get(label, FLOOR_COLOUR)}">'
                             f"{e(label)}</td>")
            cells.append(f"<td>{e(task)}</td>")
            cells.append(f'<td class="num">{e(str(s.get("n", "-")))}</td>')
            cells += [f'<td class="num">{pct(s.get("acc_P"))}</td>', f'<td class="num">{pct(s.get("acc_C"))}</td>']
            ci = s.get("delta_acc_ci")
            sub = f"<small>[{signed(ci[0])}, {signed(ci[1])}]</small>" if ci and None not in ci else ""
            cells.append(f'<td class="num">{e(signed(s.get("delta_acc")))} {sub}</td>')
            flips = s.get("flips")
            tint = "" if not flips else f' style="background:rgba(232,89,12,{0.32 * flips / flip_max:.3f})"'
            sub = (f"<small>{pct(s.get('flips_c2i'))} c→i · {pct(s.get('flips_i2c'))} i→c</small>"
                   if flips is not None else "")
            cells.append(f'<td class="num"{tint}>{pct(flips)} {sub}</td>')
            cells += [f'<td class="num">{e(c)}</td>' for c in table_cells(s)[4:]]
            total = ' class="total"' if task.startswith("micro") else ""
            out.append(f"<tr{total}>" + "".join(cells) + "</tr>")
        out.append("</tbody>")
    out.append("</table>")
    return out


def _flipped_table(rows: list[Mapping[str, Any]]) -> list[str]:
    e = html.escape
    out = ['<table class="flipped"><thead><tr><th>child</th><th>task</th><th>doc_id</th><th>flip</th>'
           "<th>question (end of prompt)</th><th>gold</th><th>parent answer</th><th>child answer</th></tr></thead><tbody>"]
    last = None
    for r in rows:
        child = r.get("child", "")
        first = ' class="first"' if last is not None and child != last else ""
        last = child
        d = flip_direction(r)
        cells = [f"<td>{e(str(child))}</td>", f"<td>{e(str(r.get('task')))}</td>",
                 f'<td class="num">{e(str(r.get("doc_id")))}</td>',
                 f'<td class="dir {"bad" if d == "c→i" else "ok"}">{d}</td>',
                 f'<td class="q">{e(str(r.get("question") or "")[-200:])}</td>', f"<td>{e(gold_text(r))}</td>"]
        for side in ("P", "C"):
            cells.append(f'<td class="{"ok" if side_value(r, "correct", side) else "bad"}">{e(answer_text(r, side))}</td>')
        out.append(f"<tr{first}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _head(report: Mapping[str, Any]) -> list[str]:
    """The page's opening: doctype, inline CSS, title and the run's provenance (parent, settings, engines, notes)."""
    e = html.escape
    parent = report.get("parent") or {}
    meta = [
        ("parent", f"<code>{e(str(parent.get('source')))}</code> (fingerprint <code>{e(str(parent.get('fingerprint')))}</code>)"),
        ("settings", " ".join(f'<span class="kv">{e(k)} <b>{e(v)}</b></span>' for k, v in settings_items(report))),
        ("vocabulary KL", e(kl_method_label(report) or "")),
        ("engines", e(engines_label(report) or "")),
        ("NaN/inf", "<br>".join(f"<b>{e(note)}</b>" for note in nonfinite_notes(report))),
        ("failed", "<br>".join(f"<b>{e(note)}</b>" for note in failed_notes(report))),
        ("created", f"{e(str(report.get('created')))} by flipcheck {e(str(report.get('flipcheck_version')))}"),
    ]
    meta = [(k, v) for k, v in meta if v]
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>flipcheck report</title>",
        f"<style>{css()}</style></head><body>",
        "<h1>flipcheck report</h1>",
        '<dl class="meta">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in meta) + "</dl>",
    ]


def _plots_html(report: Mapping[str, Any]) -> list[str]:
    """The plots as inline PNGs, two narrow ones a row; a plot that fails is logged and left out."""
    e = html.escape
    drawn = []
    for title, fn, wide in PLOTS:
        try:
            png = fn(report)
        except Exception as err:  # a plot must never cost the user the report
            log.warning("plot %r failed: %s", title, err)
            png = None
        if png:
            drawn.append((title, png, wide))
    narrow = [t for t, _, w in drawn if not w]
    figures = []
    for title, png, wide in drawn:
        # a narrow plot without a partner takes the whole row rather than leave a hole beside it
        cls = ' class="wide"' if wide or (len(narrow) % 2 and title == narrow[-1]) else ""
        figures.append(f'<figure{cls}><img alt="{e(title)}" src="data:image/png;base64,{png}">'
                       f"<figcaption><b>{e(title)}.</b> {e(_CAPTIONS.get(title, ''))}</figcaption></figure>")
    if not figures:
        return []
    return ["<h2>Plots</h2>", '<div class="plots">' + "".join(figures) + "</div>"]


def report_html(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """report.html: one self-contained page (inline CSS, base64 PNG plots, no external resources, no script).

    Top to bottom: the run's provenance, a line over all children, a card per child (accuracy change
    against flips, drawn to one scale), the table per child and task, the plots, the flipped questions.
    """
    rows = list(rows)
    e = html.escape
    colours = child_colours(report)
    parts = _head(report)
    lead = summary_line(report)
    if lead:
        parts.append(f'<p class="lead">{e(lead)}</p>')
    entries = labelled_entries(report)
    if entries and has_questions(report):
        scale = max([abs(v) for _, en in entries for v in ((overall_summary(en) or {}).get("flips"),
                                                             (overall_summary(en) or {}).get("delta_acc")) if v is not None]
                    + [1e-12])
        parts.append('<div class="cards">' + "".join(_card(lab, en, colours.get(lab, FLOOR_COLOUR), scale)
                                                      for lab, en in entries) + "</div>")
    questions = has_questions(report)
    if questions:
        parts.append("<h2>Per task</h2>")
    if entries and questions:
        parts += _summary_table(report, colours)
        parts += _subtasks_html(report, colours)
        parts.append(f'<p class="note">{e(EXPLAIN)}</p>')
        parts += slices_html(report)
    elif not entries:
        parts.append("<p>No children in this report.</p>")
    parts += generations_html(report, rows)
    parts += corpus_html(report)
    parts += _plots_html(report)
    parts += html_sections(report)  # the judge's, where the report has one
    if not questions:  # text corpora or judged answers alone: no questions to flip
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"
    flipped = flipped_rows(rows)
    head = f"Flipped questions ({len(flipped)}" + (f", first {MAX_FLIPPED}" if len(flipped) > MAX_FLIPPED else "") + ")"
    parts.append(f"<h2>{e(head)}</h2>")
    if flipped:
        parts.append('<p class="note">Questions whose correctness changed. c→i: the parent was right and the child is '
                     "wrong; i→c: the reverse. ✓ / ✗ mark right and wrong answers.</p>")
        parts += _flipped_table(flipped[:MAX_FLIPPED])
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
