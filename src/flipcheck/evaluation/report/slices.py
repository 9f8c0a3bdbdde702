"""Where a task's damage concentrates, in report.md and report.html (never in the terminal table).

Per child and named task: flips and Δacc by subtask or category, by prompt-length tercile and by
the parent's margin decile (:func:`flipcheck.evaluation.slices.slice_summaries`), the questions with
the largest KL, flipped or not (:func:`~flipcheck.evaluation.slices.top_kl`), and for generative
tasks where the two outputs first differ.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from flipcheck.evaluation.report.text import is_floor, labelled_entries, num, signed
from flipcheck.files import pct

EXPLAIN = (
    "Per task: flips and Δacc by subtask (a group) or by the documents' category/subject field, by prompt length "
    "(terciles of the prompt's characters, few-shot examples included) and by the parent's top margin (deciles of "
    "its probability gap between the best and second-best option). The slices of each kind add up to the task. "
    "Δacc in points with a paired bootstrap 95% interval; flips as a share of the slice with a Wilson 95% interval "
    "(and their count). Then the questions with the largest KL(parent ‖ child), flipped or not."
)

HEADERS = ["slicing", "slice", "range", "n", "acc P", "acc C", "Δacc pts [95% CI]", "flips [95% CI] (count)"]
TOP_HEADERS = ["doc_id", "KL", "flip", "gold", "parent answer", "child answer", "question (end of prompt)"]

_KINDS = (("category", None), ("prompt_length", "prompt length"), ("margin", "parent margin"))


def task_slices(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(child label, task, summary) for every child (noise floors left out) and named task with slices."""
    return [(label, task, s) for label, entry in labelled_entries(report) if not is_floor(label)
            for task, s in (entry.get("tasks") or {}).items()
            if isinstance(s, Mapping) and (s.get("slices") or s.get("top_kl"))]


def _range(kind: str, sl: Mapping[str, Any]) -> str:
    lo, hi = sl.get("lo"), sl.get("hi")
    if lo is None or hi is None:
        return ""
    if kind == "prompt_length":
        return f"{lo:.0f}–{hi:.0f} chars"
    return f"{lo:.3f}–{hi:.3f}"


def slice_cells(s: Mapping[str, Any]) -> list[list[str]]:
    """One row of cells (:data:`HEADERS`) per slice of a task summary, slicing by slicing."""
    out = []
    for kind, title in _KINDS:
        block = (s.get("slices") or {}).get(kind)
        if not block:
            continue
        name = title or f"by {block.get('by')}"
        for sl in block.get("slices") or []:
            ci = sl.get("delta_acc_ci")
            delta = signed(sl.get("delta_acc")) + (f" [{signed(ci[0])}, {signed(ci[1])}]" if ci else "")
            fci = sl.get("flips_ci")
            flips = pct(sl.get("flips")) + (f" [{pct(fci[0])}, {pct(fci[1])}]" if fci else "")
            flips += f" ({sl.get('n_flips', 0)})" if sl.get("n") else ""
            out.append([name, str(sl.get("slice")), _range(kind, sl), str(sl.get("n")), pct(sl.get("acc_P")),
                        pct(sl.get("acc_C")), delta, flips])
    return out


def _answer(e: Mapping[str, Any], side: str) -> str:
    return f"{'✓' if e.get(f'correct_{side}') else '✗'} {str(e.get(f'answer_{side}'))[:120]}"


def top_cells(e: Mapping[str, Any]) -> list[str]:
    """Cells (:data:`TOP_HEADERS`) of one entry of a summary's top_kl."""
    flip = ("c→i" if e.get("correct_P") else "i→c") if e.get("flipped") else ""
    question = " ".join(str(e.get("question") or "").split())
    return [str(e.get("doc_id")), num(e.get("kl")), flip, str(e.get("gold"))[:80], _answer(e, "P"), _answer(e, "C"),
            ("…" if len(question) > 100 else "") + question[-100:]]


def top_title(s: Mapping[str, Any]) -> str:
    top = s.get("top_kl") or []
    which = sorted({str(e.get("kl_of")) for e in top})
    return (f"The {len(top)} questions with the largest KL over the {' / '.join(which)}"
            f" ({sum(bool(e.get('flipped')) for e in top)} of them flipped)")


def first_difference_line(s: Mapping[str, Any]) -> str | None:
    fd = s.get("first_difference")
    if not isinstance(fd, Mapping) or not fd.get("n"):
        return None
    line = f"Outputs: {fd.get('identical')} of {fd.get('n')} identical"
    if fd.get("differ"):
        line += (f"; the other {fd['differ']} first differ at character {num(fd.get('median'))} (median; mean "
                 f"{num(fd.get('mean'))}, range {fd.get('min')}–{fd.get('max')}) of the raw generations")
    return line + "."


def _summary(s: Mapping[str, Any]) -> str:
    kinds = [f"by {s['slices']['category']['by']}" if (s.get("slices") or {}).get("category") else None,
             "prompt length" if (s.get("slices") or {}).get("prompt_length") else None,
             "parent margin" if (s.get("slices") or {}).get("margin") else None,
             "largest KL" if s.get("top_kl") else None]
    return f"{s.get('n')} questions: " + ", ".join(k for k in kinds if k)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def slices_markdown(report: Mapping[str, Any]) -> list[str]:
    items = task_slices(report)
    if not items:
        return []
    out = ["", "## Where the damage is", "", EXPLAIN]
    for label, task, s in items:
        out += ["", f"<details><summary>{html.escape(label)} / {html.escape(task)}: {html.escape(_summary(s))}"
                    "</summary>", ""]
        rows = slice_cells(s)
        if rows:
            out += [_md_row(HEADERS), "|" + "---|" * len(HEADERS), *(_md_row(r) for r in rows), ""]
        line = first_difference_line(s)
        if line:
            out += [line, ""]
        if s.get("top_kl"):
            out += [f"{top_title(s)}:", "", _md_row(TOP_HEADERS), "|" + "---|" * len(TOP_HEADERS),
                    *(_md_row(top_cells(e)) for e in s["top_kl"]), ""]
        out.append("</details>")
    return out


def slices_html(report: Mapping[str, Any]) -> list[str]:
    items = task_slices(report)
    if not items:
        return []
    e = html.escape
    out = ["<h2>Where the damage is</h2>", f'<p class="note">{e(EXPLAIN)}</p>']
    for label, task, s in items:
        out.append(f"<details><summary>{e(label)} / {e(task)}: {e(_summary(s))}</summary>")
        rows = slice_cells(s)
        if rows:
            out.append('<table class="slices"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in HEADERS)
                       + "</tr></thead><tbody>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td>{e(c)}</td>" if i < 3 else f'<td class="num">{e(c)}</td>'
                                            for i, c in enumerate(r)) + "</tr>")
            out.append("</tbody></table>")
        line = first_difference_line(s)
        if line:
            out.append(f"<p>{e(line)}</p>")
        if s.get("top_kl"):
            out.append(f"<p>{e(top_title(s))}:</p>")
            out.append('<table class="flipped"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in TOP_HEADERS)
                       + "</tr></thead><tbody>")
            for entry in s["top_kl"]:
                c = top_cells(entry)
                ok = ["ok" if entry.get("correct_P") else "bad", "ok" if entry.get("correct_C") else "bad"]
                out.append(f'<tr><td class="num">{e(c[0])}</td><td class="num">{e(c[1])}</td>'
                           f'<td class="dir {"bad" if c[2] == "c→i" else "ok"}">{e(c[2])}</td><td>{e(c[3])}</td>'
                           f'<td class="{ok[0]}">{e(c[4])}</td><td class="{ok[1]}">{e(c[5])}</td>'
                           f'<td class="q">{e(c[6])}</td></tr>')
            out.append("</tbody></table>")
        out.append("</details>")
    return out
