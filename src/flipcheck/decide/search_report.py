"""The search block in the terminal (a rich table), report.json, report.md, report.html (size vs the
judged figure: every candidate, the Pareto front, the budget line) and the winner as recipe.yaml."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from flipcheck.files import jsonable, write_json_atomic, write_text_atomic

SCHEMA = "flipcheck.search"
VERSION = 1
_LABEL = {"max_flips": "flips", "max_kl_text": "text KL", "max_kl": "KL"}


def _mib(bits: float | None) -> str:
    return "n/a" if bits is None else f"{bits / 8 / 2**20:.3f}"


def _fig(block: Mapping[str, Any], x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2%}" if block.get("figure") == "max_flips" else f"{x:.4g}"


def figure_label(block: Mapping[str, Any]) -> str:
    label = _LABEL.get(block.get("figure") or "", "figure")
    conf = block.get("search_confidence", block.get("confidence"))  # the candidates' figures: on the search split
    if block.get("figure") == "max_flips" and conf:
        label = f"flips, {conf:.2%} upper bound"
    return f"{label} (worst task)" if block.get("figure") in ("max_flips", "max_kl") else label


def _rows(block: Mapping[str, Any]) -> list[list[str]]:
    out = []
    for c in sorted(block["candidates"], key=lambda c: (c["size_bits"] is None, c["size_bits"] or 0)):
        mark = "★ " if c["winner"] else ""
        out.append([mark + c["name"], c["kind"], c["allocation_summary"], _mib(c["size_bits"]),
                    f"{c['bits_per_weight']:.3f}" if c.get("bits_per_weight") is not None else "n/a",
                    _fig(block, c["figure"]), f"{c['damage']:.4g}" if c.get("damage") is not None else "n/a",
                    _num((c.get("measured") or {}).get("kl")),
                    "PASS" if c["passed"] else "FAIL", _confirmed(block, c), "yes" if c["pareto"] else "",
                    "cached" if c["reused"] else "new"])
    return out


def _confirmed(block: Mapping[str, Any], c: Mapping[str, Any]) -> str:
    conf = c.get("confirmation")
    if not block.get("confirmation"):
        return "-"
    if conf is None:
        return ""
    return f"{'PASS' if conf['passed'] else 'FAIL'} ({_fig(block, conf.get('figure'))})"


_HEAD = ["candidate", "kind", "layers", "size MiB", "bits/weight", "figure", "predicted (additive text KL)",
         "measured KL", "verdict", "confirmed", "Pareto", "run"]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def additivity_line(block: Mapping[str, Any]) -> str | None:
    """Spearman's ρ of the additive prediction against the measured figures (decide.additivity)."""
    a = block.get("additivity") or {}
    parts = [f"{name} {a[key]:+.2f}" for key, name in (("spearman_kl", "KL over options"), ("spearman_flips", "flips"),
                                                      ("spearman_kl_text", "text KL")) if a.get(key) is not None]
    if not parts:
        return None
    return (f"predicted against measured over {a['n']} candidates: Spearman rank correlation of the additive "
            f"text KL with {', '.join(parts)} (near 1: damage adds up over layers; near 0: it does not)")


def search_table(block: Mapping[str, Any]) -> Table:
    """Every verified candidate, smallest first; the winner starred."""
    budgets = ", ".join(f"{k} {v}" for k, v in block["budgets"].items())
    conf = f" at {block['confidence']:.0%} confidence" if block.get("confidence") else ""
    t = Table(title=f"flipcheck search {block['method']} ({block['key']}: {', '.join(block['choices'])}); budgets {budgets}{conf}")
    for h in _HEAD:
        t.add_column(figure_label(block) if h == "figure" else h, justify="left" if h in ("candidate", "kind", "layers") else "right")
    for r in _rows(block):
        t.add_row(*r)
    return t


def summary_lines(block: Mapping[str, Any]) -> list[str]:
    by = {c["name"]: c for c in block["candidates"]}
    cost = block["cost"]
    lines = []
    w = by.get(block.get("winner") or "")
    u = by.get(block.get("best_uniform") or "")
    if w is None:
        lines.append("no verified candidate meets every budget")
    else:
        lines.append(f"winner {w['name']}: {w['allocation_summary']}, {_mib(w['size_bits'])} MiB, "
                     f"{figure_label(block)} {_fig(block, w['figure'])}")
        if u is not None and u["size_bits"] and w["size_bits"]:
            where = " (and not rejected by the confirmation)" if block.get("confirmation") else ""
            lines.append(f"smallest uniform child within budget{where}: {u['name']}, {_mib(u['size_bits'])} MiB "
                         f"(the winner is {1 - w['size_bits'] / u['size_bits']:.1%} smaller)")
        elif u is None:
            lines.append("no uniform child meets every budget")
    lines += frontier_lines(block)
    lines += confirmation_lines(block)
    add = additivity_line(block)
    if add:
        lines.append(add)
    lines.append(f"{cost['candidates']} candidates ({cost['new']} verified now, {cost['reused']} from an earlier run); "
                 f"{cost['wall_s']:.1f} s: probe {cost['probe_s']:.1f} s, compression {cost['compress_s']:.1f} s, "
                 f"evaluation {cost['evaluate_s']:.1f} s")
    probe = block.get("probe") or {}
    if probe.get("text"):
        lines.append(f"sensitivity and calibration text: {probe['text']}" + (f" ({probe['note']})" if probe.get("note") else ""))
    return lines


def frontier_lines(block: Mapping[str, Any]) -> list[str]:
    """One line per set of budgets (decide.frontier): its confirmed winner, size and recipe."""
    out = []
    for f in block.get("frontier") or []:
        budgets = ", ".join(f"{k} {v}" for k, v in f["budgets"].items())
        if f["winner"] is None:
            out.append(f"frontier {budgets}: no confirmed winner")
            continue
        conf = f.get("winner_confirmation")
        out.append(f"frontier {budgets}: {f['winner']}, {_mib(f['winner_size_bits'])} MiB, "
                   f"{f['winner_bits_per_weight']:.3f} bits/weight, search {_fig(block, f['winner_figure'])}"
                   + (f", confirmation {_fig(block, conf.get('figure'))}" if conf else "") + f" -> {f['recipe']}")
    return out


def confirmation_lines(block: Mapping[str, Any]) -> list[str]:
    """How the winner was confirmed: the split (or tasks), the two confidences, each confirmed candidate."""
    conf = block.get("confirmation")
    if not conf:
        return ["not confirmed (--no-confirm): the winner was judged on the questions that chose it"]
    if conf["mode"] == "split":
        sp = conf["split"]
        sizes = ", ".join(f"{u} {sp['sizes']['search'][u]}/{sp['sizes']['confirm'][u]}" for u in sp["units"])
        where = f"a {sp['fraction']:.0%} confirmation split (seed {sp['seed']}; questions search/confirmation: {sizes})"
    else:
        where = f"the confirmation tasks {', '.join(conf['tasks'])}"
    lines = [f"confirmed on {where}"
             + (f"; search split judged at {conf['search_confidence']:.2%} (1 - (1 - c)/{conf['candidates_bound']}), "
                f"confirmation at {conf['confidence']:.0%}" if conf.get("confidence") else "")]
    by = {c["name"]: c for c in block["candidates"]}
    for name in conf["confirmed"]:
        c = by[name]
        cf = c.get("confirmation") or {}
        lines.append(f"  {name}: search {_fig(block, c['figure'])} PASS, confirmation {_fig(block, cf.get('figure'))} "
                     f"{'PASS' if cf.get('passed') else 'FAIL'}" + (" -> winner" if c.get("winner") else ""))
    if block.get("winner") is None and conf["confirmed"]:
        lines.append("  no candidate that passed the search split also passed the confirmation")
    return lines


def plot_search(block: Mapping[str, Any]) -> str | None:
    """Size (MiB) vs the judged figure, base64 PNG: passing and failing candidates, uniform ones
    squared, the winner starred, the Pareto front as a step line, the budget as a dashed line."""
    from flipcheck.evaluation.report.plots import _figure, _png, _style

    pts = [c for c in block["candidates"] if c["size_bits"] is not None and c["figure"] is not None]
    if not pts:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    _style(ax)
    scale = 100.0 if block.get("figure") == "max_flips" else 1.0
    for c in pts:
        x, y = c["size_bits"] / 8 / 2**20, c["figure"] * scale
        colour = "#2ca02c" if c["passed"] else "#d62728"
        marker = "*" if c["winner"] else ("s" if c["kind"] == "uniform" else "o")
        ax.scatter([x], [y], color=colour, marker=marker, s=160 if c["winner"] else 40, zorder=3,
                   edgecolors="k" if c["winner"] else "none")
        if c["kind"] == "uniform":
            ax.annotate(c["allocation_summary"].split(" ×")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((c["size_bits"] / 8 / 2**20, c["figure"] * scale) for c in pts if c["pareto"])
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#1f77b4", lw=1, label="Pareto front")
    frontier = block.get("frontier") or []
    if frontier:  # every set's budget and its winner (decide.frontier)
        by = {c["name"]: c for c in pts}
        for i, f in enumerate(frontier):
            if f.get("figure_budget") is not None:
                ax.axhline(f["figure_budget"] * scale, color="k", ls="--", lw=0.8, alpha=0.4 + 0.6 * (i == 0),
                           label="budgets" if i == 0 else None)
            w = by.get(f.get("winner") or "")
            if w is not None:
                x, y = w["size_bits"] / 8 / 2**20, w["figure"] * scale
                ax.scatter([x], [y], marker="*", s=200, color="gold", edgecolors="k", zorder=4)
                ax.annotate(", ".join(str(v) for v in f["budgets"].values()), (x, y), textcoords="offset points",
                            xytext=(6, -10), fontsize=8)
    elif block.get("figure_budget") is not None:
        ax.axhline(block["figure_budget"] * scale, color="k", ls="--", lw=0.8, label="budget")
    ax.scatter([], [], color="#2ca02c", label="meets every budget")
    ax.scatter([], [], color="#d62728", label="fails a budget")
    ax.scatter([], [], color="grey", marker="s", label="uniform")
    ax.set_xlabel("size of the decoder Linears (MiB, stats.measure)")
    ax.set_ylabel(figure_label(block) + (" (%)" if scale == 100.0 else ""))
    ax.legend(fontsize=8)
    return _png(fig)


def search_markdown(block: Mapping[str, Any], plot: str | None = None) -> str:
    lines = [f"# flipcheck search: {block['method']} on `{block['parent']}`", ""]
    lines += [f"- {s}" for s in summary_lines(block)] + [""]
    lines += [f"Budgets: {', '.join(f'{k} {v}' for k, v in block['budgets'].items())}"
              + (f" at {block['confidence']:.0%} confidence (flips by their Clopper–Pearson upper bound, Δacc by its lower bound)"
                 if block.get("confidence") else " (point estimates)")
              + f"; tasks {', '.join(block['tasks']) or '-'}; texts {', '.join(block['texts']) or '-'}.", ""]
    head = [figure_label(block) if h == "figure" else h for h in _HEAD]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(block)]
    if plot:
        lines += ["", f"![size vs {figure_label(block)}]({plot})"]
    lines += ["", "Verdicts:", ""]
    for c in block["candidates"]:
        for v in c["verdicts"]:
            lines.append(f"- `{c['name']}`: {v}")
        for v in (c.get("confirmation") or {}).get("verdicts", []):
            lines.append(f"- `{c['name']}` (confirmation): {v}")
    split = (block.get("confirmation") or {}).get("split")
    if split:
        lines += ["", "Question ids (lm-eval doc ids) of the confirmation split; the search split holds the others:", ""]
        lines += [f"- `{task}`: {_spans(ids)}" for task, ids in split["confirm"].items()]
    return "\n".join(lines) + "\n"


def _spans(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    for i in sorted(ids):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def search_html(block: Mapping[str, Any], png: str | None) -> str:
    from flipcheck.evaluation.report.html import css

    e = html.escape
    head = [figure_label(block) if h == "figure" else h for h in _HEAD]
    rows = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in _rows(block))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>flipcheck search</title><style>{css()}</style></head><body>",
             f"<h1>flipcheck search: {e(block['method'])} on {e(str(block['parent']))}</h1>",
             "<ul>" + "".join(f"<li>{e(s)}</li>" for s in summary_lines(block)) + "</ul>"]
    if png:
        parts.append(f'<figure><img alt="size vs {e(figure_label(block))}" src="data:image/png;base64,{png}">'
                     "<figcaption>Every verified candidate: size against the judged figure; the dashed line is the "
                     "budget, the step line the Pareto front, the star the winner.</figcaption></figure>")
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + f"</tr></thead><tbody>{rows}</tbody></table>")
    verdicts = "".join(f"<li><code>{e(c['name'])}</code>: {e(v)}</li>" for c in block["candidates"] for v in c["verdicts"])
    parts.append(f"<h2>Verdicts</h2><ul>{verdicts}</ul></body></html>")
    return "\n".join(parts)


def winner_recipe(block: Mapping[str, Any]) -> str | None:
    """The winner as recipe YAML that `flipcheck run` accepts (validated by loading it back)."""
    from flipcheck.recipes.schema import GateSpec, Recipe, StepSpec, dump_recipe, parse_recipe

    w = next((c for c in block["candidates"] if c["winner"]), None)
    if w is None:
        return None
    base = dict(block["recipe"])
    base.pop("children", None)
    gate = GateSpec(**block["budgets"], confidence=block.get("confidence"))
    recipe = Recipe.model_validate({
        **base, "name": "search-winner",
        "description": f"flipcheck search winner: {block['method']} {w['allocation_summary']} ({_mib(w['size_bits'])} MiB)",
        "steps": [StepSpec(method=block["method"], settings=w["settings"]).model_dump(mode="json")],
        "gate": gate.model_dump(mode="json", exclude_none=True),
    })
    text = dump_recipe(recipe)
    parse_recipe(text, "recipe.yaml")  # what a user's `flipcheck run` will load
    return text


def write_search(out: str | os.PathLike, block: Mapping[str, Any]) -> Path:
    """OUT/report.json ({"schema": "flipcheck.search", "version": 1, "search": block}), report.md,
    report.html, search.png and the winner's recipe.yaml (where one meets every budget)."""
    import base64

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "report.json", {"schema": SCHEMA, "version": VERSION, "search": jsonable(block)})
    png = plot_search(block)
    if png:
        tmp = folder / ".search.png.tmp"
        tmp.write_bytes(base64.b64decode(png))
        os.replace(tmp, folder / "search.png")
    write_text_atomic(folder / "report.md", search_markdown(block, "search.png" if png else None))
    write_text_atomic(folder / "report.html", search_html(block, png))
    text = winner_recipe(block)
    if text is not None:
        write_text_atomic(folder / "recipe.yaml", text)
    elif (folder / "recipe.yaml").exists():
        (folder / "recipe.yaml").unlink()
    return folder
