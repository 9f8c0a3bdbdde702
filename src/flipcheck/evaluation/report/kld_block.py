"""llama.cpp's KL statistics block and KL by the parent's confidence, per child and text corpus
(figures: :mod:`flipcheck.evaluation.kld_block`), for report.md and report.html."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from flipcheck.evaluation.kld_block import format_block
from flipcheck.evaluation.report.text import labelled_entries, num3

NOTE = ("As llama-perplexity --kl-divergence prints them (same names, order and formats; it scores the second half of "
        "each window: compare with --scoring half and --ctx equal to its -c). Brackets: 95 % bootstrap intervals of "
        "the tail percentiles over windows, which llama.cpp does not give.")
BUCKET_NOTE = ("KL(P‖C) by the parent's top-token probability: a mean KL is dominated by the positions where the "
               "parent is itself undecided.")


def _blocks(report: Mapping[str, Any]):
    for label, entry in labelled_entries(report):
        for name, fig in (entry.get("corpus") or {}).items():
            if fig.get("llama_cpp"):
                yield label, name, fig


def _bucket_rows(fig: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for b in fig.get("kl_by_p_top") or []:
        lo, hi = b["p_top"]
        share = b.get("kl_share")
        rows.append([f"{lo:g}–{hi:g}", str(b["tokens"]), f"{100 * b['share']:.1f}%", num3(b.get("kl_mean")),
                     "-" if share is None else f"{100 * share:.1f}%"])
    return rows


BUCKET_HEADERS = ["parent top p", "tokens", "share of tokens", "mean KL(P‖C)", "share of summed KL"]


def kld_markdown(report: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for label, name, fig in _blocks(report):
        out += ["", f"### {label} / {name}: llama.cpp KL statistics", "", NOTE, "", "```text",
                *format_block(fig["llama_cpp"]), "```"]
        rows = _bucket_rows(fig)
        if rows:
            out += ["", BUCKET_NOTE, "", "| " + " | ".join(BUCKET_HEADERS) + " |", "|" + "---|" * len(BUCKET_HEADERS)]
            out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def kld_html(report: Mapping[str, Any]) -> list[str]:
    e = html.escape
    out: list[str] = []
    for label, name, fig in _blocks(report):
        out += [f"<h3>{e(label)} / {e(name)}: llama.cpp KL statistics</h3>", f'<p class="note">{e(NOTE)}</p>',
                "<pre>" + e("\n".join(format_block(fig["llama_cpp"]))) + "</pre>"]
        rows = _bucket_rows(fig)
        if rows:
            out.append('<table class="corpus"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in BUCKET_HEADERS)
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                                                         for r in rows) + "</tbody></table>")
            out.append(f'<p class="note">{e(BUCKET_NOTE)}</p>')
    return out
