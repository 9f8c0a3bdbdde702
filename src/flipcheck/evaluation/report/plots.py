"""The report's plots, as base64 PNG (matplotlib Agg through Figure objects: no pyplot, no global
backend switch)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from flipcheck.evaluation.metrics import pearson
from flipcheck.evaluation.report.text import floor_max, is_floor, labelled_entries, mean_of, overall_summary

# matplotlib's tab10 order without its grey, which marks the noise floor everywhere
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


FLOOR_COLOUR = "#7f7f7f"


TASK_MARKERS = "osD^vP*Xph"


_DPI = 110


def child_colours(report: Mapping[str, Any]) -> dict[str, str]:
    """One colour per child label, shared by the page and every plot; grey for the noise floor."""
    out = {str(c.get("name")): PALETTE[i % len(PALETTE)] for i, c in enumerate(report.get("children") or [])}
    for label, _ in labelled_entries(report):
        if is_floor(label):
            out[label] = FLOOR_COLOUR
    return out


def legend_label(label: str) -> str:
    # matplotlib hides legend labels starting with "_" (lm-eval's folder names do: __tmp__model)
    return label.lstrip("_") or label


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float = 5.6, h: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    return fig


def _style(ax) -> None:
    ax.grid(True, color="#e6e6e6", lw=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


def strength_value(entry: Mapping[str, Any]) -> tuple[str, float] | None:
    """(name, value) of a child's numeric strength ({"sigma": 0.05} -> ("sigma", 0.05)), else None."""
    s = entry.get("strength")
    if isinstance(s, int | float) and not isinstance(s, bool):
        return "strength", float(s)
    if isinstance(s, Mapping) and len(s) == 1:
        (k, v), = s.items()
        if isinstance(v, int | float) and not isinstance(v, bool):
            return str(k), float(v)
    return None


def plot_acc_vs_flips(report: Mapping[str, Any]) -> str | None:
    """Accuracy change vs flips, one point per child (Dutta et al. 2024, figure 1).

    The grey wedge below flips = |Δacc| cannot hold a point (Δacc = i→c − c→i, flips = c→i + i→c):
    the higher a point sits above the wedge, the more answers changed that accuracy does not show.
    """
    colours = child_colours(report)
    pts = [(lab, overall_summary(e), is_floor(lab)) for lab, e in labelled_entries(report)]
    pts = [(lab, s, floor) for lab, s, floor in pts if s and s.get("delta_acc") is not None and s.get("flips") is not None]
    if not pts:
        return None
    fig = _figure()
    ax = fig.subplots()
    _style(ax)
    xs = [100 * s["delta_acc"] for _, s, _ in pts]
    ys = [100 * s["flips"] for _, s, _ in pts]
    top = max(max(ys), max(abs(x) for x in xs), 1.0) * 1.18
    half = max(max(abs(x) for x in xs) * 1.35, top * 0.35, 1.0)
    ax.fill_between([-half, 0.0, half], [half, 0.0, half], [0.0, 0.0, 0.0], color="#eeeeee", lw=0)
    ax.plot([-half, 0.0, half], [half, 0.0, half], color="#bbbbbb", lw=0.8, ls="--")
    ax.text(half * 0.97, min(half, top) * 0.06, "impossible:\nflips < |Δacc|", ha="right", va="bottom", fontsize=8,
            color="#888888")
    ax.axvline(0.0, color="#999999", lw=0.8)
    placed: list[tuple[float, float, bool]] = []
    for (lab, _, floor), x, y in sorted(zip(pts, xs, ys, strict=True), key=lambda t: -t[2]):
        ax.scatter([x], [y], s=45, marker="x" if floor else "o", color=colours.get(lab, FLOOR_COLOUR), zorder=3)
        # labels point away from the vertical line, where the other children crowd, if they fit there
        width = (len(lab) + 2) * 0.0165 * 2 * half  # about 0.0165 axis widths per character at 8.5 pt
        left = x < 0 and x - width > -half
        dy = 4
        while any(side == left and abs(py - (y + dy * top / 300)) < top * 0.045 and abs(px - x) < half * 0.6
                  for px, py, side in placed):
            dy -= 11  # a label already sits there: move this one down a line
        placed.append((x, y + dy * top / 300, left))
        ax.annotate(legend_label(lab), (x, y), textcoords="offset points", xytext=(-6 if left else 6, dy),
                    ha="right" if left else "left", fontsize=8.5, color="#555555" if floor else "#222222")
    ax.set_xlim(-half, half)
    ax.set_ylim(0.0, top)
    ax.set_xlabel("accuracy change, child − parent (points)")
    ax.set_ylabel("flips (% of questions)")
    ax.set_title("Accuracy change vs flips (all questions)", fontsize=11)
    return _png(fig)


def sweep_groups(report: Mapping[str, Any]) -> dict[str, list[tuple[float, str, Mapping[str, Any]]]]:
    """Children grouped by method where at least two share it with a numeric strength."""
    groups: dict[str, list[tuple[float, str, Mapping[str, Any]]]] = {}
    for c in report.get("children") or []:
        sv, s = strength_value(c), overall_summary(c)
        if sv is None or s is None:
            continue
        key = f"{c.get('method') or '?'} ({sv[0]})"
        groups.setdefault(key, []).append((sv[1], str(c.get("name")), s))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in groups.items() if len(v) >= 2}


def plot_sweeps(report: Mapping[str, Any]) -> str | None:
    """Δacc (with its paired-bootstrap 95% interval) and flips against strength, a line per swept method."""
    groups = sweep_groups(report)
    if not groups:
        return None
    fig = _figure(11.6, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    for i, (key, pts) in enumerate(groups.items()):
        colour = PALETTE[i % len(PALETTE)]
        xs = [p[0] for p in pts]
        dy = [100 * (p[2].get("delta_acc") or 0.0) for p in pts]
        ci = [p[2].get("delta_acc_ci") for p in pts]
        if all(c and None not in c for c in ci):
            lo = [d - 100 * c[0] for d, c in zip(dy, ci, strict=True)]
            hi = [100 * c[1] - d for d, c in zip(dy, ci, strict=True)]
            ax1.errorbar(xs, dy, yerr=[lo, hi], marker="o", capsize=3, color=colour, label=key)
        else:
            ax1.plot(xs, dy, marker="o", color=colour, label=key)
        ax2.plot(xs, [100 * (p[2].get("flips") or 0.0) for p in pts], marker="o", color=colour, label=key)
        ax2.plot(xs, [abs(d) for d in dy], ls=":", color=colour, lw=1, label=f"{key}: |Δacc|")
    floor = floor_max(report, "flips")
    if floor is not None:
        ax2.axhline(100 * floor, color=FLOOR_COLOUR, lw=1, ls="--", label="noise floor (largest row)")
    names = {key.rsplit("(", 1)[-1].rstrip(")") for key in groups}
    xlabel = next(iter(names)) if len(names) == 1 else "strength"
    for ax in (ax1, ax2):
        _style(ax)
        ax.set_xlabel(xlabel)
        if len(groups) == 1:
            ax.set_xticks([p[0] for p in next(iter(groups.values()))])
    ax2.legend(fontsize=8, frameon=False)
    if len(groups) > 1:
        ax1.legend(fontsize=8, frameon=False)
    ax1.axhline(0.0, color="#999999", lw=0.8)
    ax1.set_ylabel("accuracy change (points)")
    ax1.set_title("Accuracy change, with 95% interval", fontsize=11)
    ax2.set_ylim(bottom=0.0)
    ax2.set_ylabel("% of questions")
    ax2.set_title("Flips (solid) against |accuracy change| (dotted)", fontsize=11)
    return _png(fig)


def flips_kl_points(report: Mapping[str, Any]) -> list[tuple[str, str, float, float]]:
    """(child, task, KL, flips) per child and task; KL over options, else over the vocabulary."""
    out = []
    for c in report.get("children") or []:
        for task, s in (c.get("tasks") or {}).items():
            kl = mean_of(s.get("kl_options"))
            if kl is None:
                kl = mean_of(s.get("kl_vocab"))
            if kl is not None and s.get("flips") is not None:
                out.append((str(c.get("name")), task, float(kl), float(s["flips"])))
    return out


def plot_flips_vs_kl(report: Mapping[str, Any]) -> str | None:
    """Flips against mean KL per child and task, with the Pearson correlation."""
    pts = flips_kl_points(report)
    if not pts:
        return None
    colours = child_colours(report)
    r = pearson([p[2] for p in pts], [p[3] for p in pts])
    tasks = list(dict.fromkeys(p[1] for p in pts))
    fig = _figure()
    ax = fig.subplots()
    _style(ax)
    from matplotlib.lines import Line2D

    children = list(dict.fromkeys(p[0] for p in pts))
    for child in children:
        for j, task in enumerate(tasks):
            mine = [p for p in pts if p[0] == child and p[1] == task]
            if mine:
                ax.scatter([p[2] for p in mine], [100 * p[3] for p in mine], s=45, color=colours.get(child),
                           marker=TASK_MARKERS[j % len(TASK_MARKERS)], zorder=3)
    ax.set_xlim(left=0.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("mean KL(parent ‖ child)" + (f" on {tasks[0]}" if len(tasks) == 1 else ""))
    ax.set_ylabel("flips (% of questions)")
    ax.set_title("Flips vs KL" + (f" (Pearson r = {r:.2f}, {len(pts)} points)" if r is not None else ""), fontsize=11)
    # one legend entry per child (colour) and per task (marker), not one per pair
    handles = [Line2D([], [], ls="", marker="o", color=colours.get(c), label=legend_label(c)) for c in children]
    if len(tasks) > 1:
        handles += [Line2D([], [], ls="", marker=TASK_MARKERS[j % len(TASK_MARKERS)], color="0.45", label=t)
                    for j, t in enumerate(tasks)]
    if len(handles) > 6:
        ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.legend(handles=handles, fontsize=8, loc="best")
    return _png(fig)


def plot_margin_deciles(report: Mapping[str, Any]) -> str | None:
    """Flip rate per decile of the parent's top margin, one line per child."""
    colours = child_colours(report)
    fig, drawn = _figure(11.6, 3.6), False
    ax = fig.subplots()
    _style(ax)
    for label, e in labelled_entries(report):
        s = overall_summary(e)
        dec = ((s or {}).get("margin") or {}).get("deciles") or []
        xs = [d["bin"] + 1 for d in dec if d.get("flip_rate") is not None]
        ys = [100 * d["flip_rate"] for d in dec if d.get("flip_rate") is not None]
        if xs:
            floor = is_floor(label)
            ax.plot(xs, ys, marker="x" if floor else "o", ms=4, label=legend_label(label),
                    color=colours.get(label, FLOOR_COLOUR), ls="--" if floor else "-", lw=1.4)
            drawn = True
    if not drawn:
        return None
    ax.set_xticks(range(1, 11))
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("decile of the parent's top margin (1 = least confident)")
    ax.set_ylabel("flip rate (% of the decile)")
    ax.set_title("Flip rate by the parent's confidence", fontsize=11)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


PLOTS = (  # (title, function, drawn wide): the page pairs the narrow ones side by side
    ("Accuracy change vs flips", plot_acc_vs_flips, False),
    ("Flips vs KL", plot_flips_vs_kl, False),
    ("Sweeps", plot_sweeps, True),
    ("Flip rate vs the parent's top margin", plot_margin_deciles, True),
)


_CAPTIONS = {
    "Accuracy change vs flips": "One point per child, all questions pooled. Accuracy change is the x distance from "
    "the vertical line; flips the height. No point can fall in the grey wedge (flips ≥ |Δacc|): the higher a point "
    "sits above it, the more answers changed without accuracy showing it.",
    "Sweeps": "Each swept method against its strength. Left: accuracy change with its paired-bootstrap 95% "
    "interval. Right: flips (solid) next to |accuracy change| (dotted): the gap between them is what accuracy hides.",
    "Flips vs KL": "One point per child and task (colour: child; marker: task). KL over the answer options "
    "(over the vocabulary where a task has no options) tracks the flips.",
    "Flip rate vs the parent's top margin": "Questions binned by the parent's confidence (best minus second-best "
    "option probability). Flips concentrate where the parent was unsure.",
}
