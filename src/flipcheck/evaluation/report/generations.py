"""Divergence over whole generations in the report (figures: :mod:`flipcheck.evaluation.generations`).

One table (report.md and report.html) with a row per child, noise-floor row and generative task, and
two plots per generative task: the survival curves S(t) of every child on one axis, and each
question's generation length, parent against child. report.html embeds the plots; report.md links
PNG files written beside it (:func:`write_plots`).
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flipcheck.evaluation.report.plots import FLOOR_COLOUR, _figure, _png, _style, child_colours, legend_label
from flipcheck.evaluation.report.text import is_floor, labelled_entries, num3
from flipcheck.files import write_bytes_atomic

log = logging.getLogger(__name__)

MARKS = (16, 64, 128)  # S(t) columns of the table

HEADERS = ["child", "task", "n", "identical", *[f"S({t})" for t in MARKS], "median first divergent token",
           "teacher-forced mismatch", "length C/P median", "p90", "token limit P → C"]

EXPLAIN = ("Parent P and child C generate from the same prompt tokens. identical: the share of questions whose "
           "two generations are the same token for token; S(t): the share whose child generation equals the "
           "parent's through token t (a generation that ended identically survives every t); the first divergent "
           "token is an index into the parent's generation (median over questions, '-' when at least half never "
           "diverge); teacher-forced mismatch: the share of positions along the parent's generation where the "
           "child's top token is not the parent's; length C/P: the child's generated tokens over the parent's, "
           "per question; token limit: the share of generations that ran to the task's token limit instead of "
           "stopping (EOS or a stop sequence).")


def generation_rows(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(child label, task, generation block) for every child and floor row with generative tasks."""
    return [(label, task, s["generation"]) for label, entry in labelled_entries(report)
            for task, s in (entry.get("tasks") or {}).items() if isinstance(s, Mapping) and s.get("generation")]


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def cells(g: Mapping[str, Any]) -> list[str]:
    marks = g.get("survival_at") or {}
    lr = g.get("length_ratio") or {}
    tp, tc = (g.get("termination_P") or {}).get("length"), (g.get("termination_C") or {}).get("length")
    med = g.get("median_first_divergent_token")
    return [str(g.get("n", "-")), _pct(g.get("identical")), *[_pct(_at(g, t, marks)) for t in MARKS],
            "-" if med is None else f"{med:g}", _pct(g.get("tf_mismatch")), num3(lr.get("median")), num3(lr.get("p90")),
            f"{_pct(tp)} → {_pct(tc)}"]


def _at(g: Mapping[str, Any], t: int, marks: Mapping[str, Any]) -> float | None:
    if str(t) in marks:
        return marks[str(t)]
    curve = g.get("survival") or []
    return curve[min(t, len(curve)) - 1] if curve else None


def _slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("_") or "task"


def _tasks(report: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(task for _, task, _ in generation_rows(report)))


def plot_files(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(file name, title, kind) of the plots report.md links, one pair per generative task."""
    out = []
    for task in _tasks(report):
        out.append((f"generations-survival-{_slug(task)}.png", f"survival S(t), {task}", "survival"))
        out.append((f"generations-lengths-{_slug(task)}.png", f"generation lengths, {task}", "lengths"))
    return out


def generations_markdown(report: Mapping[str, Any]) -> list[str]:
    rows = generation_rows(report)
    if not rows:
        return []
    out = ["", "## Divergence over generations", "", EXPLAIN, "", "| " + " | ".join(HEADERS) + " |",
           "|" + "---|" * len(HEADERS)]
    for label, task, g in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in [label, task, *cells(g)]) + " |")
    out.append("")
    out += [f"![{title}]({name})" for name, title, _ in plot_files(report)]
    return out


def generations_html(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> list[str]:
    table = generation_rows(report)
    if not table:
        return []
    e = html.escape
    out = ["<h2>Divergence over generations</h2>",
           '<table class="corpus"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>"]
    for label, task, g in table:
        cls = ' class="floor"' if is_floor(label) else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in [label, task, *cells(g)]) + "</tr>")
    out += ["</tbody></table>", f'<p class="note">{e(EXPLAIN)}</p>']
    figures = []
    for _name, title, png in _drawn(report, list(rows)):
        figures.append(f'<figure><img alt="{e(title)}" src="data:image/png;base64,{png}">'
                       f"<figcaption><b>{e(title)}.</b></figcaption></figure>")
    if figures:
        out.append('<div class="plots">' + "".join(figures) + "</div>")
    return out


def _drawn(report: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(file name, title, base64 PNG) of every plot that could be drawn (a failed plot is logged and left out)."""
    out = []
    for name, title, kind in plot_files(report):
        task = title.split(", ", 1)[1]
        try:
            png = plot_survival(report, task) if kind == "survival" else plot_lengths(report, rows, task)
        except Exception as err:  # a plot must never cost the user the report
            log.warning("plot %r failed: %s", title, err)
            png = None
        if png:
            out.append((name, title, png))
    return out


def write_plots(folder: str | Path, report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write the PNG files report.md links (each atomically)."""
    import base64


    for name, _title, png in _drawn(report, list(rows)):
        write_bytes_atomic(Path(folder) / name, base64.b64decode(png))


def plot_survival(report: Mapping[str, Any], task: str) -> str | None:
    """S(t) of every child (and floor row, dashed grey) of one task on one axis."""
    series = [(label, g) for label, t, g in generation_rows(report) if t == task and g.get("survival")]
    if not series:
        return None
    colours = child_colours(report)
    fig = _figure()
    ax = fig.add_subplot()
    for label, g in series:
        curve = g["survival"]
        floor = is_floor(label)
        ax.step(range(0, len(curve) + 1), [100.0] + [100 * v for v in curve], where="post",
                label=legend_label(label), color=colours.get(label, FLOOR_COLOUR), ls="--" if floor else "-")
    ax.set_xlabel("generated token t")
    ax.set_ylabel("% of questions identical through t")
    ax.set_ylim(-2, 102)
    _style(ax)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def plot_lengths(report: Mapping[str, Any], rows: list[Mapping[str, Any]], task: str) -> str | None:
    """Each question's generated tokens, parent (x) against child (y), a colour per child; the diagonal is equal length."""
    colours = child_colours(report)
    points: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        g = r.get("generation")
        if r.get("task") == task and g:
            points.setdefault(str(r.get("child")), []).append((g["len_P"], g["len_C"]))
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    top = max(max(max(a, b) for a, b in pts) for pts in points.values()) or 1
    ax.plot([0, top], [0, top], color="#bbbbbb", lw=1)
    for label, pts in points.items():
        ax.scatter([a for a, _ in pts], [b for _, b in pts], s=14, alpha=0.6, label=legend_label(label),
                   color=colours.get(label, FLOOR_COLOUR))
    ax.set_xlabel("parent: generated tokens")
    ax.set_ylabel("child: generated tokens")
    _style(ax)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)
