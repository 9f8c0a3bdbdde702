"""A run folder: report.json (versioned schema), samples.jsonl, report.md and report.html.

report.json (``"schema": "flipcheck.report", "version": 1``)::

    {"schema", "version", "created", "flipcheck_version",
     "parent": {"source", "fingerprint"},
     "settings": {tasks, num_fewshot, limit, seed, batch_size, dtype, device, ...},
     "children": [{"name", "source", "fingerprint", "method", "settings",
                   "strength": {"sigma": 0.05} | null, "compression": [step reports],
                   "tasks": {task: summary}, "micro": summary, "macro": {...}}],
     "noise_floor": {same shape as a child} | null}

Task summaries are those of :func:`flipcheck.evaluation.samples.summarize_task`. samples.jsonl
holds one per-question row per line (a :class:`~flipcheck.evaluation.samples.SampleRow` plus the
``child`` it belongs to). report.html is one self-contained file: inline CSS and PNG plots
embedded as base64, no external resources, so it can be mailed or attached to a CI run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from flipcheck import __version__
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.metrics import pearson
from flipcheck.models import write_json_atomic

log = logging.getLogger(__name__)

SCHEMA = "flipcheck.report"
VERSION = 1
REPORT_FILE = "report.json"
SAMPLES_FILE = "samples.jsonl"
MAX_FLIPPED = 200  # flipped questions listed in report.md / report.html


# ---------------------------------------------------------------------------------------------
# building, writing and reading


def new_report(
    parent: Mapping[str, Any],
    settings: Mapping[str, Any],
    children: list[dict[str, Any]],
    noise_floor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict of the current schema version, stamped with the time and flipcheck version."""
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "flipcheck_version": __version__,
        "parent": {"source": parent.get("source"), "fingerprint": parent.get("fingerprint")},
        "settings": dict(settings),
        "children": children,
        "noise_floor": noise_floor,
    }


def child_entry(
    name: str,
    tasks: Mapping[str, dict[str, Any]],
    *,
    micro: dict[str, Any] | None = None,
    macro: dict[str, Any] | None = None,
    source: str | None = None,
    fingerprint: str | None = None,
    method: str | None = None,
    settings: dict[str, Any] | None = None,
    strength: dict[str, float] | None = None,
    compression: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One entry of ``children`` (or the ``noise_floor``)."""
    return {
        "name": name,
        "source": source,
        "fingerprint": fingerprint,
        "method": method,
        "settings": settings,
        "strength": strength,
        "compression": compression or [],
        "tasks": dict(tasks),
        "micro": micro,
        "macro": macro,
    }


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy -> Python, NaN/inf -> None, tuples -> lists, dataclasses -> dicts."""
    if hasattr(x, "to_dict") and callable(x.to_dict):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:
        x = x.item()
    if hasattr(x, "tolist") and callable(x.tolist):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, str | int | float | bool):
        return x
    return str(x)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(folder: str | os.PathLike, report: Mapping[str, Any], rows: Iterable[Any]) -> Path:
    """Write report.json, samples.jsonl, report.md and report.html into `folder` (each atomically).

    `rows` are per-question rows (SampleRow dicts) each with a ``child`` field naming its child.
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rep = _jsonable(report)
    _validate(rep, folder / REPORT_FILE)
    row_dicts = [_jsonable(r) for r in rows]
    write_json_atomic(folder / REPORT_FILE, rep)
    _write_text_atomic(
        folder / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in row_dicts)
    )
    _write_text_atomic(folder / "report.md", report_markdown(rep, row_dicts))
    _write_text_atomic(folder / "report.html", report_html(rep, row_dicts))
    log.info("report written to %s", folder)
    return folder


def _validate(data: Any, path: Any) -> None:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise FlipcheckError(f"{path} is not a flipcheck report (no \"schema\": \"{SCHEMA}\")")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FlipcheckError(f"{path} is not a flipcheck report (its version is {version!r}, not an integer)")
    if version > VERSION:
        raise FlipcheckError(
            f"{path} was written by a newer flipcheck (report version {version}); this one reads version {VERSION}: upgrade flipcheck"
        )
    if not isinstance(data.get("children"), list):
        raise FlipcheckError(f"{path} is not a flipcheck report (no list of children)")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate report.json (or the run folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_FILE
    if not p.is_file():
        raise FlipcheckError(f"{p}: no such report file (expected report.json or the run folder holding it)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise FlipcheckError(f"{p} is not a flipcheck report (not JSON: {str(err).splitlines()[0]})") from err
    _validate(data, p)
    return data


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-question rows of a run folder (its samples.jsonl)."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
    if not p.is_file():
        raise FlipcheckError(f"{p}: no such samples file")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# formatting


def _pct(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _signed_pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _pts(x: Any) -> str:
    """A change in accuracy in percentage points, with a real minus sign: −0.7 pts."""
    return "-" if x is None else f"{100 * x:+.1f} pts".replace("-", "−")


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def _num3(x: Any) -> str:
    return "-" if x is None else f"{x:.2g}" if abs(x) < 0.01 else f"{x:.3g}"


def _pvalue(p: Any) -> str:
    if p is None:
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def _mean_of(block: Any) -> Any:
    return block.get("mean") if isinstance(block, Mapping) else None


def _entries(report: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, entry) for every child and the noise floor."""
    out = [(str(c.get("name")), c) for c in report.get("children") or []]
    if report.get("noise_floor"):
        out.append(("noise floor", report["noise_floor"]))
    return out


def _summaries(entry: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = list((entry.get("tasks") or {}).items())
    if len(rows) > 1 and entry.get("micro"):
        rows.append(("micro (all questions)", entry["micro"]))
    return rows


def table_cells(s: Mapping[str, Any]) -> list[str]:
    """acc P, acc C, Δacc [CI], flips (c→i / i→c), answer changes, KL options, KL vocab, top-1."""
    ci = s.get("delta_acc_ci")
    delta = _signed_pct(s.get("delta_acc"))
    if ci and s.get("delta_acc") is not None:
        delta += f" [{_signed_pct(ci[0])}, {_signed_pct(ci[1])}]"
    flips = _pct(s.get("flips"))
    if s.get("flips") is not None:
        flips += f" ({_pct(s.get('flips_c2i'))} / {_pct(s.get('flips_i2c'))})"
    return [
        _pct(s.get("acc_P")),
        _pct(s.get("acc_C")),
        delta,
        flips,
        _pct(s.get("answer_changes")),
        _num(_mean_of(s.get("kl_options"))),
        _num(_mean_of(s.get("kl_vocab"))),
        _pct(s.get("top1_agree")),
    ]


HEADERS = ["child", "task", "n", "acc P", "acc C", "Δacc pts [95% CI]", "flips (c→i / i→c)", "answer changes",
           "KL options", "KL vocab", "top-1 agree"]


def render_table(report: Mapping[str, Any], *, width: int | None = None) -> Table:
    """The terminal table: a section per child, a row per task (plus micro over all questions).

    Under 120 columns (`width`, e.g. ``console.width``) the table drops the CI, the flip
    directions, answer changes and top-1 agreement so the figures that matter stay readable in
    an 80-column terminal; report.md and report.html always have everything.
    """
    compact = width is not None and width < 120
    parent = (report.get("parent") or {}).get("source") or "?"
    table = Table(title=f"flipcheck: children vs parent {parent}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("child / task", justify="left", overflow="fold", min_width=25 if compact else 10)
    heads = (
        ["n", "acc P→C", "Δacc", "flips", "KL opt", "KL voc"]
        if compact
        else ["n", "acc P", "acc C", "Δacc pts [95% CI]", "flips (c→i / i→c)", "answer changes",
              "KL options", "KL vocab", "top-1 agree"]
    )
    for h in heads:
        table.add_column(h, justify="right", no_wrap=True)
    for label, entry in _entries(report):
        dim = label == "noise floor"
        table.add_row(f"[bold]{label}[/]", style="dim" if dim else None)
        for task, s in _summaries(entry):
            if compact:
                cells = [
                    f"{_pct(s.get('acc_P'))}→{_pct(s.get('acc_C'))}".replace("%→", "→"),
                    _signed_pct(s.get("delta_acc")),
                    _pct(s.get("flips")),
                    _num3(_mean_of(s.get("kl_options"))),
                    _num3(_mean_of(s.get("kl_vocab"))),
                ]
            else:
                cells = table_cells(s)
            name = "all (micro)" if compact and task.startswith("micro") else task
            table.add_row(f"  {name}", str(s.get("n", "-")), *cells, style="dim" if dim else None)
        table.add_section()
    return table


def _overall(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The summary that speaks for a whole child: micro over all questions, or its only task."""
    if entry.get("micro"):
        return entry["micro"]
    tasks = list((entry.get("tasks") or {}).values())
    return tasks[0] if len(tasks) == 1 else None


def headline(s: Mapping[str, Any] | None) -> str | None:
    """One sentence for a summary: what accuracy says, then the flips accuracy hides.

    "accuracy 58.0% → 57.3% (−0.7 pts, 95% CI −6.0 to +4.0; McNemar p = 0.82), yet 11.3% of answers
    flipped (6.0% right → wrong, 5.3% wrong → right)". Flips are never below |Δacc| (Δacc =
    i→c − c→i while flips = c→i + i→c); "yet" marks a child whose flips exceed twice |Δacc|,
    Dutta et al.'s observation that accuracy hides most of the change.
    """
    if not s or s.get("acc_P") is None or s.get("acc_C") is None:
        return None
    delta = s.get("delta_acc")
    inner = [_pts(delta)]
    ci = s.get("delta_acc_ci")
    if ci and None not in ci:
        inner.append(f"95% CI {_signed_pct(ci[0])} to {_signed_pct(ci[1])}".replace("-", "−"))
    if s.get("mcnemar_p") is not None:
        inner[-1] += f"; McNemar p = {_pvalue(s['mcnemar_p'])}"
    text = f"accuracy {_pct(s['acc_P'])} → {_pct(s['acc_C'])} ({', '.join(inner)})"
    flips = s.get("flips")
    if flips is None:
        return text
    hidden = delta is not None and flips > 2 * abs(delta)
    text += f", {'yet' if hidden else 'and'} {_pct(flips)} of answers flipped"
    if s.get("flips_c2i") is not None and s.get("flips_i2c") is not None:
        text += f" ({_pct(s['flips_c2i'])} right → wrong, {_pct(s['flips_i2c'])} wrong → right)"
    return text


def summary_line(report: Mapping[str, Any]) -> str | None:
    """One line over all children: how far accuracy moved against how many answers flipped."""
    overall = [_overall(c) for c in report.get("children") or []]
    overall = [s for s in overall if s and s.get("delta_acc") is not None and s.get("flips") is not None]
    if not overall:
        return None
    deltas = [abs(s["delta_acc"]) for s in overall]
    flips = [s["flips"] for s in overall]
    n = len(overall)
    if n == 1:
        text = f"1 child: accuracy moved by {100 * deltas[0]:.1f} points, while {_pct(flips[0])} of answers flipped"
    else:
        text = (f"{n} children: accuracy moved by at most {100 * max(deltas):.1f} points, while "
                f"{100 * min(flips):.1f}–{_pct(max(flips))} of answers flipped")
    floor = _overall(report.get("noise_floor") or {})
    if floor and floor.get("flips") is not None:
        text += f" (noise floor: {_pct(floor['flips'])})"
    return text + "."


def _strength_text(entry: Mapping[str, Any]) -> str:
    s = entry.get("strength")
    if isinstance(s, Mapping):
        return ", ".join(f"{k} {v}" for k, v in s.items())
    if s is None:
        settings = entry.get("settings")
        if isinstance(settings, Mapping) and settings:
            return ", ".join(f"{k} {v}" for k, v in list(settings.items())[:4])
        return ""
    return str(s)


def describe(entry: Mapping[str, Any]) -> str:
    """What a child is: "wanda, sparsity 0.2 · 16 bits/weight, 20.0% zeros" (method, strength, stats)."""
    head = ", ".join(x for x in (entry.get("method"), _strength_text(entry)) if x)
    steps = []
    for c in entry.get("compression") or []:
        if not isinstance(c, Mapping):
            continue
        bits = c.get("bits_per_weight")
        stats = [f"{bits:.3g} bits/weight" if isinstance(bits, int | float) and bits else None,
                 f"{_pct(c.get('sparsity'))} zeros" if c.get("sparsity") else None]
        stats = ", ".join(x for x in stats if x)
        if stats:
            steps.append(f"{c.get('method')}: {stats}" if len(entry.get("compression") or []) > 1 else stats)
    return " · ".join(x for x in (head, "; ".join(steps)) if x)


def _flipped(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if bool(r.get("correct_P")) != bool(r.get("correct_C"))]


def _option(row: Mapping[str, Any], value: Any) -> str:
    """An option index with its text ("2: green") where the row has the options; the value otherwise."""
    choices = row.get("choices")
    if isinstance(value, int) and not isinstance(value, bool) and choices and 0 <= value < len(choices):
        return f"{value}: {choices[value]}"
    return str(value)


def _answer(row: Mapping[str, Any], side: str) -> str:
    mark = "✓" if row.get(f"correct_{side}") else "✗"
    return f"{mark} {_option(row, row.get(f'pred_{side}'))[:120]}"


def _gold(row: Mapping[str, Any]) -> str:
    return _option(row, row.get("gold"))[:80]


def _direction(row: Mapping[str, Any]) -> str:
    return "c→i" if row.get("correct_P") else "i→c"


def _settings_items(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in (report.get("settings") or {}).items():
        if v is None:
            continue
        if isinstance(v, list | tuple):
            v = ", ".join(str(x) for x in v)
        out.append((str(k), str(v)))
    return out


def _settings_line(report: Mapping[str, Any]) -> str:
    return " · ".join(f"{k}={v}" for k, v in _settings_items(report))


def _md_escape(text: str) -> str:
    """Text shown as itself in Markdown prose: a child named __tmp__model is not bold.

    Underscores inside a word (group_size) are left alone, as GitHub's Markdown leaves them.
    """
    text = re.sub(r"([\\`*\[\]<>|])", r"\\\1", text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)


_EXPLAIN = (
    "Flips: questions whose correctness changed (c→i: parent right, child wrong; i→c: the reverse), as a "
    "fraction of all questions; flips are never below |Δacc|, and a child can keep its accuracy while flipping "
    "many answers. Answer changes also count wrong → different wrong. Δacc in points with a paired bootstrap 95% "
    "interval. KL: mean over questions of KL(parent ‖ child) over the options, and mean over scored tokens over "
    "the vocabulary. Top-1 agree: scored tokens where parent and child rank the same token first."
)


def report_markdown(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """report.md: a line per child, the table per child and task, and the flipped questions."""
    rows = list(rows)
    parent = report.get("parent") or {}
    out = [
        "# flipcheck report",
        "",
        f"- parent: `{parent.get('source')}` (fingerprint `{parent.get('fingerprint')}`)",
        *([f"- settings: {_settings_line(report)}"] if _settings_items(report) else []),
        f"- created: {report.get('created')} by flipcheck {report.get('flipcheck_version')}",
    ]
    lead = summary_line(report)
    glance = [(label, entry, headline(_overall(entry))) for label, entry in _entries(report)]
    if lead or any(h for _, _, h in glance):
        out += ["", "## At a glance", ""]
        if lead:
            out += [lead, ""]
        for label, entry, line in glance:
            what = describe(entry)
            if line or what:
                out.append(f"- **{_md_escape(label)}**" + (f" ({_md_escape(what)})" if what else "")
                           + (f": {line}" if line else ""))
    out += [
        "",
        "## Per task",
        "",
        _EXPLAIN,
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for label, entry in _entries(report):
        for task, s in _summaries(entry):
            cells = [label, task, str(s.get("n", "-")), *table_cells(s)]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    flipped = _flipped(rows)
    out += ["", f"## Flipped questions ({len(flipped)}" + (f", first {MAX_FLIPPED}" if len(flipped) > MAX_FLIPPED else "") + ")",
            ""]
    if flipped:
        out += ["✓ / ✗: the answer was right / wrong. c→i: the parent was right and the child is wrong; i→c: the "
                "reverse.", "", "| child | task | doc_id | gold | parent answer | child answer | flip | question (end of prompt) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in flipped[:MAX_FLIPPED]:
            question = " ".join(str(r.get("question") or "").split())
            cells = [str(r.get("child", "")), str(r.get("task")), str(r.get("doc_id")), _gold(r),
                     _answer(r, "P"), _answer(r, "C"), _direction(r), ("…" if len(question) > 100 else "") + question[-100:]]
            out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# plots (matplotlib Agg through Figure objects: no pyplot, no global backend switch)

# matplotlib's tab10 order without its grey, which marks the noise floor everywhere
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
FLOOR_COLOUR = "#7f7f7f"
TASK_MARKERS = "osD^vP*Xph"
_DPI = 110


def child_colours(report: Mapping[str, Any]) -> dict[str, str]:
    """One colour per child label, shared by the page and every plot; grey for the noise floor."""
    out = {str(c.get("name")): PALETTE[i % len(PALETTE)] for i, c in enumerate(report.get("children") or [])}
    out["noise floor"] = FLOOR_COLOUR
    return out


def _legend_label(label: str) -> str:
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
    pts = [(lab, _overall(e), lab == "noise floor") for lab, e in _entries(report)]
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
        ax.annotate(_legend_label(lab), (x, y), textcoords="offset points", xytext=(-6 if left else 6, dy),
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
        sv, s = strength_value(c), _overall(c)
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
    floor = _overall(report.get("noise_floor") or {})
    if floor and floor.get("flips") is not None:
        ax2.axhline(100 * floor["flips"], color=FLOOR_COLOUR, lw=1, ls="--", label="noise floor")
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
            kl = _mean_of(s.get("kl_options"))
            if kl is None:
                kl = _mean_of(s.get("kl_vocab"))
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
    handles = [Line2D([], [], ls="", marker="o", color=colours.get(c), label=_legend_label(c)) for c in children]
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
    for label, e in _entries(report):
        s = _overall(e)
        dec = ((s or {}).get("margin") or {}).get("deciles") or []
        xs = [d["bin"] + 1 for d in dec if d.get("flip_rate") is not None]
        ys = [100 * d["flip_rate"] for d in dec if d.get("flip_rate") is not None]
        if xs:
            floor = label == "noise floor"
            ax.plot(xs, ys, marker="x" if floor else "o", ms=4, label=_legend_label(label),
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

_CSS = """
:root{--ink:#1d2430;--muted:#5c6675;--line:#dfe3e8;--soft:#f6f7f9;--ok:#1a7f37;--bad:#c62828}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--ink);
 margin:0 auto;padding:24px 32px 48px;max-width:1400px;background:#fff}
h1{font-size:1.6em;margin:0 0 .2em}
h2{font-size:1.2em;margin:1.8em 0 .5em;padding-bottom:.25em;border-bottom:1px solid var(--line)}
code{font-size:.92em;background:var(--soft);padding:0 .25em;border-radius:3px}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;color:var(--muted);font-size:.9em;margin:.4em 0 0}
.meta dt{font-weight:600}.meta dd{margin:0}
.kv{display:inline-block;margin:0 .9em .1em 0}.kv b{color:var(--ink);font-weight:600}
.lead{font-size:1.15em;margin:1em 0 .8em;padding:.6em .9em;background:#fff7e6;border-left:4px solid #f0a020;
 border-radius:0 6px 6px 0}
.note{color:var(--muted);font-size:.88em;max-width:75em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.card{border:1px solid var(--line);border-top:5px solid var(--c);border-radius:8px;padding:10px 14px 12px}
.card.floor{background:var(--soft)}
.card .name{font-weight:700;font-size:1.05em;word-break:break-all}
.card .what{color:var(--muted);font-size:.85em;min-height:1.3em}
.big{display:flex;gap:26px;margin:.45em 0 .35em}
.big div{display:flex;flex-direction:column}
.big b{font-size:1.55em;line-height:1.1;font-variant-numeric:tabular-nums}
.big span{color:var(--muted);font-size:.8em;white-space:nowrap}
.bar{display:grid;grid-template-columns:4.6em 1fr;align-items:center;gap:6px;font-size:.78em;color:var(--muted);
 margin:2px 0}
.track{background:var(--soft);border-radius:3px;height:9px;overflow:hidden}
.fill{display:block;height:100%;border-radius:3px}
.fill.acc{background:#8a94a6}.fill.flip{background:#e8590c}
.card p{margin:.45em 0 0;font-size:.85em}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid var(--line);padding:.35em .65em;vertical-align:top;text-align:left}
th{background:var(--soft);border-bottom:2px solid #c9ced6;font-weight:600;white-space:nowrap}
.summary tbody{border-top:2px solid #c9ced6}
td.num{text-align:right;white-space:nowrap}
td.child{font-weight:600;border-left:5px solid var(--c)}
td small{display:block;color:var(--muted);font-size:.82em}
tr.total td{font-weight:600;background:#fafbfc}
tbody.floor td{color:#808894}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:16px 24px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px}
figure.wide{grid-column:1/-1}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{color:var(--muted);font-size:.86em;margin-top:.4em}
figcaption b{color:var(--ink)}
.flipped td.q{max-width:40em;color:#333}
.flipped tr.first td{border-top:2px solid #c9ced6}
.ok{color:var(--ok)}.bad{color:var(--bad)}
.dir{font-weight:600;white-space:nowrap}
"""


def _card(label: str, entry: Mapping[str, Any], colour: str, scale: float) -> str:
    e = html.escape
    s = _overall(entry) or {}
    floor = label == "noise floor"
    delta, flips = s.get("delta_acc"), s.get("flips")
    big = [f"<div><b>{e(_pts(delta).replace(' pts', ''))}</b><span>accuracy, points</span></div>",
           f"<div><b>{e(_pct(flips))}</b><span>of answers flipped</span></div>"]
    extra = [f"{name} {fmt(v)}" for name, v, fmt in (
        ("KL options", _mean_of(s.get("kl_options")), lambda v: f"{v:.3g}"),
        ("KL vocab", _mean_of(s.get("kl_vocab")), lambda v: f"{v:.3g}"),
        ("top-1", s.get("top1_agree"), _pct),
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


def _summary_table(report: Mapping[str, Any], colours: Mapping[str, str]) -> list[str]:
    e = html.escape
    heads = ["child", "task", "n", "acc P", "acc C", "Δacc (pts)", "flips", "answer changes", "KL options",
             "KL vocab", "top-1 agree"]
    out = ['<table class="summary"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead>"]
    flip_max = max([s.get("flips") or 0.0 for _, en in _entries(report) for _, s in _summaries(en)] + [1e-12])
    for label, entry in _entries(report):
        summaries = _summaries(entry)
        if not summaries:
            continue
        out.append('<tbody class="floor">' if label == "noise floor" else "<tbody>")
        for j, (task, s) in enumerate(summaries):
            cells = []
            if j == 0:
                cells.append(f'<td class="child" rowspan="{len(summaries)}" style="--c:{colours.get(label, FLOOR_COLOUR)}">'
                             f"{e(label)}</td>")
            cells.append(f"<td>{e(task)}</td>")
            cells.append(f'<td class="num">{e(str(s.get("n", "-")))}</td>')
            cells += [f'<td class="num">{_pct(s.get("acc_P"))}</td>', f'<td class="num">{_pct(s.get("acc_C"))}</td>']
            ci = s.get("delta_acc_ci")
            sub = f"<small>[{_signed_pct(ci[0])}, {_signed_pct(ci[1])}]</small>" if ci and None not in ci else ""
            cells.append(f'<td class="num">{e(_signed_pct(s.get("delta_acc")))} {sub}</td>')
            flips = s.get("flips")
            tint = "" if not flips else f' style="background:rgba(232,89,12,{0.32 * flips / flip_max:.3f})"'
            sub = (f"<small>{_pct(s.get('flips_c2i'))} c→i · {_pct(s.get('flips_i2c'))} i→c</small>"
                   if flips is not None else "")
            cells.append(f'<td class="num"{tint}>{_pct(flips)} {sub}</td>')
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
        d = _direction(r)
        cells = [f"<td>{e(str(child))}</td>", f"<td>{e(str(r.get('task')))}</td>",
                 f'<td class="num">{e(str(r.get("doc_id")))}</td>',
                 f'<td class="dir {"bad" if d == "c→i" else "ok"}">{d}</td>',
                 f'<td class="q">{e(str(r.get("question") or "")[-200:])}</td>', f"<td>{e(_gold(r))}</td>"]
        for side in ("P", "C"):
            cells.append(f'<td class="{"ok" if r.get(f"correct_{side}") else "bad"}">{e(_answer(r, side))}</td>')
        out.append(f"<tr{first}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def report_html(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """report.html: one self-contained page (inline CSS, base64 PNG plots, no external resources, no script).

    Top to bottom: the run's provenance, a line over all children, a card per child (accuracy change
    against flips, drawn to one scale), the table per child and task, the plots, the flipped questions.
    """
    rows = list(rows)
    e = html.escape
    parent = report.get("parent") or {}
    colours = child_colours(report)
    meta = [
        ("parent", f"<code>{e(str(parent.get('source')))}</code> (fingerprint <code>{e(str(parent.get('fingerprint')))}</code>)"),
        ("settings", " ".join(f'<span class="kv">{e(k)} <b>{e(v)}</b></span>' for k, v in _settings_items(report))),
        ("created", f"{e(str(report.get('created')))} by flipcheck {e(str(report.get('flipcheck_version')))}"),
    ]
    meta = [(k, v) for k, v in meta if v]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>flipcheck report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>flipcheck report</h1>",
        '<dl class="meta">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in meta) + "</dl>",
    ]
    lead = summary_line(report)
    if lead:
        parts.append(f'<p class="lead">{e(lead)}</p>')
    entries = _entries(report)
    if entries:
        scale = max([abs(v) for _, en in entries for v in ((_overall(en) or {}).get("flips"),
                                                             (_overall(en) or {}).get("delta_acc")) if v is not None]
                    + [1e-12])
        parts.append('<div class="cards">' + "".join(_card(lab, en, colours.get(lab, FLOOR_COLOUR), scale)
                                                      for lab, en in entries) + "</div>")
    parts.append("<h2>Per task</h2>")
    if entries:
        parts += _summary_table(report, colours)
        parts.append(f'<p class="note">{e(_EXPLAIN)}</p>')
    else:
        parts.append("<p>No children in this report.</p>")
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
    if figures:
        parts.append("<h2>Plots</h2>")
        parts.append('<div class="plots">' + "".join(figures) + "</div>")
    flipped = _flipped(rows)
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
