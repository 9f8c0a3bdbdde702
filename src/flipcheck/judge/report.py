"""The judge section of report.md and report.html, and the Δscore-vs-flips/KL plot.

Per judged child: mean scores of parent and child with the paired 95% interval of the
difference, per-category means, win/tie/loss, what could not be parsed, and the prompts where
the child lost most with both answers side by side. Across children: Δscore against flips and
against KL with Pearson's r (Dutta et al. 2024's MT-Bench finding), drawn in report.html.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from flipcheck.evaluation.report.plots import _figure, _png, _style, child_colours, legend_label
from flipcheck.files import pct
from flipcheck.judge.stats import correlation


def judged(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in report.get("children") or [] if c.get("judge")]


def _num(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _signed(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:+.{digits}f}".replace("-", "−")


def _ci(ci: Any) -> str:
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ci and None not in ci else "-"


def child_line(j: Mapping[str, Any]) -> str:
    """One line: scores and Δ with its interval, then win/tie/loss, then what did not parse."""
    parts = []
    s = j.get("single")
    if s:
        parts.append(f"score {_num(s.get('parent_mean'))} → {_num(s.get('child_mean'))} "
                     f"(Δ {_signed(s.get('delta'))}, 95% CI {_ci(s.get('delta_ci'))}, {s.get('n', 0)} paired answers)")
        bad = sum((s.get("unparsed") or {}).values()) + sum((s.get("failed") or {}).values())
        if bad:
            parts.append(f"{sum((s.get('unparsed') or {}).values())} ratings unparsed, "
                         f"{sum((s.get('failed') or {}).values())} failed")
    p = j.get("pairwise")
    if p:
        parts.append(f"vs parent: {p['win']} win / {p['tie']} tie / {p['loss']} loss"
                     + (f" ({p['inconsistent']} ties from orders that disagreed)" if p.get("inconsistent") else "")
                     + (f", {p['unparsed']} unparsed" if p.get("unparsed") else "")
                     + (f", {p['failed']} failed" if p.get("failed") else ""))
    return "; ".join(parts)


def correlation_line(report: Mapping[str, Any]) -> str:
    c = report.get("judge_correlation") or correlation(report)
    if not c.get("points"):
        return ""
    bits = []
    if c.get("r_flips") is not None:
        bits.append(f"{c['measure']} vs flips: Pearson r = {c['r_flips']:.2f} ({c['n_flips']} children)")
    if c.get("r_kl") is not None:
        bits.append(f"{c['measure']} vs KL: r = {c['r_kl']:.2f} ({c['n_kl']} children)")
    if not bits:
        return (c.get("note") or "no correlation") + "."
    return "; ".join(bits) + (f" ({c['note']})" if c.get("note") else "") + "."


def terminal_lines(report: Mapping[str, Any]) -> list[str]:
    """What the terminal shows after a judged run: a line per child, the correlation, the judge's traffic."""
    children = judged(report)
    if not children:
        return []
    out = [f"{c.get('name')}: {child_line(c['judge'])}" for c in children]
    line = correlation_line(report)
    if line:
        out.append(line)
    run = report.get("judge_run") or {}
    if run:
        out.append(f"judge: {run.get('requests', 0)} requests, {run.get('answered', 0)} new verdicts"
                   + (f", {run['seconds_per_verdict']} s per verdict" if run.get("seconds_per_verdict") else ""))
    return out


def _settings(report: Mapping[str, Any]) -> str:
    j = judged(report)[0]["judge"]
    judge = j.get("judge") or {}
    pr = j.get("prompts") or {}
    return (f"judge `{judge.get('model')}` at {judge.get('url')}, grading prompts {j.get('grader_version')}, "
            f"{pr.get('n')} prompts from {pr.get('source')}, mode {j.get('mode')}, answers up to "
            f"{j.get('max_new_tokens')} new tokens (greedy)")


def _md(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def judge_markdown(report: Mapping[str, Any]) -> list[str]:
    """The '## Judged answers' section of report.md (nothing when no child was judged)."""
    children = judged(report)
    if not children:
        return []
    out = ["", "## Judged answers", "", f"- {_md(_settings(report))}"]
    line = correlation_line(report)
    if line:
        out.append(f"- {line}")
    out += ["", "| child | score P | score C | Δscore | 95% CI | win | tie | loss | unparsed / failed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in children:
        j = c["judge"]
        s, p = j.get("single") or {}, j.get("pairwise") or {}
        bad = [sum((s.get("unparsed") or {}).values()) + p.get("unparsed", 0),
               sum((s.get("failed") or {}).values()) + p.get("failed", 0)]
        cells = [str(c.get("name")), _num(s.get("parent_mean")), _num(s.get("child_mean")), _signed(s.get("delta")),
                 _ci(s.get("delta_ci")), str(p.get("win", "-")), str(p.get("tie", "-")), str(p.get("loss", "-")),
                 f"{bad[0]} / {bad[1]}"]
        out.append("| " + " | ".join(_md(x) for x in cells) + " |")
    for c in children:
        j = c["judge"]
        cats = (j.get("single") or {}).get("per_category") or {}
        if cats:
            out += ["", f"### {_md(c.get('name'))}: per category", "", "| category | n | score P | score C | Δ |",
                    "|---|---|---|---|---|"]
            for cat, m in cats.items():
                out.append(f"| {_md(cat)} | {m['n']} | {_num(m['parent'])} | {_num(m['child'])} | {_signed(m['delta'])} |")
        worst = j.get("worst") or []
        if worst:
            out += ["", f"### {_md(c.get('name'))}: prompts the child lost most", ""]
            for w in worst:
                out.append(f"**{_md(w['id'])}** ({_md(w.get('category') or '-')}): Δ {_signed(w.get('delta'))}"
                           + (f", pairwise {w['pair']}" if w.get("pair") else ""))
                out += ["", "| turn | user | parent answer | child answer |", "|---|---|---|---|"]
                for t, q in enumerate(w.get("turns") or []):
                    pa, ca = (w.get("parent_answers") or [""])[t:t + 1], (w.get("child_answers") or [""])[t:t + 1]
                    ps, cs = (w.get("parent_scores") or [None])[t:t + 1], (w.get("child_scores") or [None])[t:t + 1]
                    out.append(f"| {t + 1} | {_md(q)[:300]} | {_md(pa[0] if pa else '')[:600]} ({_num(ps[0] if ps else None, 0)}) "
                               f"| {_md(ca[0] if ca else '')[:600]} ({_num(cs[0] if cs else None, 0)}) |")
                out.append("")
    return out


def judge_html(report: Mapping[str, Any]) -> list[str]:
    """The 'Judged answers' section of report.html (nothing when no child was judged)."""
    children = judged(report)
    if not children:
        return []
    e = html.escape
    out = ["<h2>Judged answers</h2>", f'<p class="note">{e(_settings(report).replace("`", ""))}</p>']
    line = correlation_line(report)
    if line:
        out.append(f'<p class="lead">{e(line)}</p>')
    heads = ["child", "score P", "score C", "Δscore", "95% CI", "win", "tie", "loss", "win rate", "unparsed", "failed"]
    out.append('<table class="summary"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead><tbody>")
    for c in children:
        j = c["judge"]
        s, p = j.get("single") or {}, j.get("pairwise") or {}
        cells = [e(str(c.get("name"))), _num(s.get("parent_mean")), _num(s.get("child_mean")), e(_signed(s.get("delta"))),
                 e(_ci(s.get("delta_ci"))), str(p.get("win", "-")), str(p.get("tie", "-")), str(p.get("loss", "-")),
                 pct(p.get("win_rate")), str(sum((s.get("unparsed") or {}).values()) + p.get("unparsed", 0)),
                 str(sum((s.get("failed") or {}).values()) + p.get("failed", 0))]
        out.append("<tr>" + "".join(f'<td class="num">{x}</td>' if i else f"<td>{x}</td>" for i, x in enumerate(cells)) + "</tr>")
    out.append("</tbody></table>")
    png = plot_judge(report)
    if png:
        out.append('<div class="plots"><figure class="wide"><img alt="Judged score change vs flips and KL" '
                   f'src="data:image/png;base64,{png}"><figcaption><b>Judged score change vs flips and KL.</b> One '
                   "point per child: the judge's score change against the flips and KL of its lm-eval tasks. "
                   "The paper finds the judged drop tracks flips and KL, not accuracy.</figcaption></figure></div>")
    for c in children:
        j = c["judge"]
        cats = (j.get("single") or {}).get("per_category") or {}
        if cats:
            out.append(f"<details><summary>{e(str(c.get('name')))}: per category</summary>"
                       '<table class="summary"><thead><tr><th>category</th><th>n</th><th>score P</th><th>score C</th>'
                       "<th>Δ</th></tr></thead><tbody>")
            for cat, m in cats.items():
                out.append(f"<tr><td>{e(cat)}</td><td class=\"num\">{m['n']}</td><td class=\"num\">{_num(m['parent'])}</td>"
                           f"<td class=\"num\">{_num(m['child'])}</td><td class=\"num\">{e(_signed(m['delta']))}</td></tr>")
            out.append("</tbody></table></details>")
        worst = j.get("worst") or []
        if worst:
            out.append(f"<h3>{e(str(c.get('name')))}: prompts the child lost most</h3>")
            out.append('<table class="flipped"><thead><tr><th>prompt</th><th>turn</th><th>user</th><th>parent answer</th>'
                       "<th>child answer</th></tr></thead><tbody>")
            for w in worst:
                turns = w.get("turns") or []
                for t, q in enumerate(turns):
                    ps = (w.get("parent_scores") or [None] * len(turns))[t]
                    cs = (w.get("child_scores") or [None] * len(turns))[t]
                    head = ""
                    if t == 0:
                        label = f"{w['id']} ({w.get('category') or '-'}) Δ {_signed(w.get('delta'))}" + (
                            f", pairwise {w['pair']}" if w.get("pair") else "")
                        head = f'<td rowspan="{len(turns)}">{e(label)}</td>'
                    out.append(f"<tr>{head}<td class=\"num\">{t + 1}</td><td class=\"q\">{e(q)}</td>"
                               f"<td>{e((w.get('parent_answers') or [''] * len(turns))[t])} <small>({_num(ps, 0)})</small></td>"
                               f"<td>{e((w.get('child_answers') or [''] * len(turns))[t])} <small>({_num(cs, 0)})</small></td></tr>")
            out.append("</tbody></table>")
    return out


def plot_judge(report: Mapping[str, Any]) -> str | None:
    """Δscore against flips (left) and against KL (right), one point per child, with Pearson's r."""
    c = report.get("judge_correlation") or correlation(report)
    pts = c.get("points") or []
    if not any(p.get("flips") is not None or p.get("kl") is not None for p in pts):
        return None
    colours = child_colours(report)
    fig = _figure(11.6, 3.8)
    axes = fig.subplots(1, 2)
    for ax, key, name, label, r in ((axes[0], "flips", "flips", "flips (% of questions)", c.get("r_flips")),
                                    (axes[1], "kl", "KL", "mean KL(parent ‖ child)", c.get("r_kl"))):
        _style(ax)
        mine = [p for p in pts if p.get(key) is not None]
        for p in mine:
            x = 100 * p[key] if key == "flips" else p[key]
            ax.scatter([x], [p["delta"]], s=45, color=colours.get(p["child"]), zorder=3)
            ax.annotate(legend_label(p["child"]), (x, p["delta"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(0.0, color="#999999", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{c.get('measure', 'Δscore')}, child − parent")
        ax.set_title(f"vs {name}" + (f" (Pearson r = {r:.2f}, {len(mine)} children)" if r is not None else ""), fontsize=11)
    return _png(fig)
