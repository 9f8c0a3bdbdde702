"""Distance on text in the report: the table (terminal, md, html) and the two plots per corpus."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.table import Table

from flipcheck.evaluation.report.plots import FLOOR_COLOUR, _figure, _png, _style, child_colours, legend_label
from flipcheck.evaluation.report.text import labelled_entries, num3

HEADERS = ["child", "corpus", "tokens", "KL(P‖C) mean [95% CI]", "median", "p99", "max", "KL(C‖P) mean",
           "top-1 agree", "RMS Δp", "p99 |Δp|", "PPL P → C", "ln(PPL C / PPL P)"]

EXPLAIN = ("Per scored token of the corpus: KL(P‖C) and KL(C‖P) over the whole vocabulary (P the parent's, C the "
           "child's next-token distribution), whether their top-1 tokens agree, and Δp = C(next) − P(next), the "
           "change of the probability of the actual next token. Intervals resample whole windows.")


def corpus_rows(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(child label, corpus name, figures) for every child and noise-floor row that has corpus figures."""
    return [(label, name, fig) for label, entry in labelled_entries(report)
            for name, fig in (entry.get("corpus") or {}).items()]


def _mean_ci(block: Any, digits: str = "num3") -> str:
    if not isinstance(block, Mapping) or block.get("mean") is None:
        return "-"
    text = num3(block["mean"])
    ci = block.get("ci")
    if ci and None not in ci:
        text += f" [{num3(ci[0])}, {num3(ci[1])}]"
    return text


def cells(fig: Mapping[str, Any]) -> list[str]:
    kl = fig.get("kl") or {}
    ppl_p, ppl_c = fig.get("ppl_parent"), fig.get("ppl_child")
    agree = (fig.get("top1_agree") or {}).get("mean")
    ratio = fig.get("ln_ppl_ratio") or {}
    bad = fig.get("nonfinite") or {}
    tokens = str(fig.get("tokens", "-")) + (f" (+{bad.get('child', 0) + bad.get('parent', 0)} NaN/inf)"
                                            if any(bad.values()) else "")
    return [
        tokens, _mean_ci(kl), num3(kl.get("median")), num3(kl.get("p99")), num3(kl.get("max")),
        num3((fig.get("kl_rev") or {}).get("mean")),
        "-" if agree is None else f"{100 * agree:.2f}%",
        num3(fig.get("dp_rms")), num3(fig.get("dp_p99")),
        "-" if ppl_p is None else f"{ppl_p:.4g} → {ppl_c:.4g}",
        _signed(ratio.get("mean"), ratio.get("ci")),
    ]


def _signed(x: Any, ci: Any) -> str:
    if x is None:
        return "-"
    text = f"{x:+.4f}"
    if ci and None not in ci:
        text += f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    return text


def method_note(report: Mapping[str, Any]) -> str:
    """Which KL the corpus table holds, in words."""
    method = (report.get("kl_method") or {}).get("name")
    s = report.get("settings") or {}
    conv = f"windows of {s.get('ctx')} tokens, {'second half of each window' if s.get('scoring') == 'half' else 'every position'} scored"
    if method == "exact":
        return f"{conv}; both KLs exact (parent in lock-step)"
    return (f"{conv}; KL(P‖C) estimated from the parent's stored top-K and sampled tail, KL(C‖P) the same top-K "
            "with an importance-sampled tail (both unbiased estimates of the mean)")


COMPACT_HEADERS = ["child", "corpus", "KL P‖C", "KL C‖P", "top-1", "RMS Δp", "ln PPL C/P"]


def _compact_cells(fig: Mapping[str, Any]) -> list[str]:
    full = cells(fig)  # tokens, KL [CI], median, p99, max, KL rev, top-1, RMS, p99 |Δp|, PPL, ln ratio [CI]
    return [full[1].split(" [")[0], full[5], full[6], full[7], full[10].split(" [")[0]]


def corpus_table(report: Mapping[str, Any], *, width: int | None = None) -> Table | None:
    """The terminal's "distance on text" table; under 160 columns (`width`) only the main figures
    without intervals (report.md and report.html always have every column)."""
    rows = corpus_rows(report)
    if not rows:
        return None
    compact = width is not None and width < 160
    heads = COMPACT_HEADERS if compact else HEADERS
    table = Table(title="distance on text", caption=method_note(report), box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for i, h in enumerate(heads):
        table.add_column(h, justify="left" if i < 2 else "right", overflow="fold", no_wrap=i >= 2,
                         min_width=12 if i < 2 else None)
    for label, name, fig in rows:
        values = _compact_cells(fig) if compact else cells(fig)
        table.add_row(label, name, *values, style="dim" if label.startswith("noise floor") else None)
    return table


def corpus_markdown(report: Mapping[str, Any]) -> list[str]:
    rows = corpus_rows(report)
    if not rows:
        return []
    out = ["", "## Distance on text", "", EXPLAIN + " " + method_note(report) + ".", "",
           "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for label, name, fig in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in [label, name, *cells(fig)]) + " |")
    from flipcheck.evaluation.report.kld_block import kld_markdown

    return out + kld_markdown(report)


def corpus_html(report: Mapping[str, Any]) -> list[str]:
    rows = corpus_rows(report)
    if not rows:
        return []
    e = html.escape
    out = ["<h2>Distance on text</h2>", '<table class="corpus"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in HEADERS)
           + "</tr></thead><tbody>"]
    for label, name, fig in rows:
        cls = ' class="floor"' if label.startswith("noise floor") else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in [label, name, *cells(fig)]) + "</tr>")
    out.append("</tbody></table>")
    out.append(f'<p class="note">{e(EXPLAIN)} {e(method_note(report))}.</p>')
    figures = []
    for name in dict.fromkeys(n for _, n, _ in rows):
        for title, png in ((f"KL(P‖C) per token, {name}", plot_kl_hist(report, name)),
                           (f"Δp per token, {name}", plot_dp_hist(report, name))):
            if png:
                figures.append(f'<figure><img alt="{e(title)}" src="data:image/png;base64,{png}">'
                               f"<figcaption><b>{e(title)}.</b></figcaption></figure>")
    if figures:
        out.append('<div class="plots">' + "".join(figures) + "</div>")
    from flipcheck.evaluation.report.kld_block import kld_html

    return out + kld_html(report)


def _hists(report: Mapping[str, Any], name: str, key: str):
    colours = child_colours(report)
    for label, corpus, fig in corpus_rows(report):
        h = fig.get(key) if corpus == name else None
        if h and sum(h.get("counts") or []):
            yield label, h, colours.get(label, FLOOR_COLOUR)


def plot_kl_hist(report: Mapping[str, Any], name: str) -> str | None:
    """Share of tokens per KL(P‖C) bin (log-spaced), one step line per child."""
    return _plot_hist(report, name, "kl_hist", "KL(P‖C) at a token (nats)", kl=True)


def plot_dp_hist(report: Mapping[str, Any], name: str) -> str | None:
    """Share of tokens per Δp bin (log scale of the share: the tails are what matters)."""
    return _plot_hist(report, name, "dp_hist", "Δp = C(next) − P(next)", kl=False)


def _plot_hist(report: Mapping[str, Any], name: str, key: str, xlabel: str, *, kl: bool) -> str | None:
    series = list(_hists(report, name, key))
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label, h, colour in series:
        edges, counts = h["edges"], h["counts"]
        total = sum(counts)
        style = {"label": legend_label(label), "color": colour, "ls": "--" if label.startswith("noise floor") else "-"}
        if kl:  # a step per log-spaced bin, from its lower edge (the first bin starts at 0: drawn from 1e-7)
            ax.step([max(edges[i], 1e-7) for i in range(len(counts))], [100 * c / total for c in counts],
                    where="post", **style)
        else:  # a point per bin; empty bins are gaps on the log scale
            mids = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))]
            ax.plot(mids, [100 * c / total if c else math.nan for c in counts], marker=".", **style)
    if kl:
        ax.set_xscale("log")
    else:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("% of tokens")
    _style(ax)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)
