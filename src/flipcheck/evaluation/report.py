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
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


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


def render_table(report: Mapping[str, Any]) -> Table:
    """The terminal table: one row per child and task (plus micro over all questions)."""
    parent = (report.get("parent") or {}).get("source") or "?"
    table = Table(title=f"flipcheck: children vs parent {parent}", show_lines=False)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i >= 2)
    for label, entry in _entries(report):
        for j, (task, s) in enumerate(_summaries(entry)):
            table.add_row(label if j == 0 else "", task, str(s.get("n", "-")), *table_cells(s),
                          style="dim" if label == "noise floor" else None)
        table.add_section()
    return table


def _flipped(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if bool(r.get("correct_P")) != bool(r.get("correct_C"))]


def _answer(row: Mapping[str, Any], side: str) -> str:
    pred = row.get(f"pred_{side}")
    choices = row.get("choices")
    if isinstance(pred, int) and not isinstance(pred, bool) and choices and 0 <= pred < len(choices):
        text = f"{pred}: {choices[pred]}"
    else:
        text = str(pred)
    mark = "✓" if row.get(f"correct_{side}") else "✗"
    return f"{mark} {text[:120]}"


def _settings_line(report: Mapping[str, Any]) -> str:
    s = report.get("settings") or {}
    return ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)


def report_markdown(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """report.md: the table per child and task, the noise floor, and the flipped questions."""
    rows = list(rows)
    parent = report.get("parent") or {}
    out = [
        "# flipcheck report",
        "",
        f"- parent: `{parent.get('source')}` (fingerprint `{parent.get('fingerprint')}`)",
        f"- settings: {_settings_line(report)}",
        f"- created: {report.get('created')} by flipcheck {report.get('flipcheck_version')}",
        "",
        "Flips: questions whose correctness changed (c→i: parent right, child wrong; i→c: the reverse), as a "
        "fraction of all questions. Answer changes also count wrong → different wrong. KL: mean over questions of "
        "KL(parent ‖ child) over the options, and mean over scored tokens over the vocabulary.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for label, entry in _entries(report):
        for task, s in _summaries(entry):
            cells = [label, task, str(s.get("n", "-")), *table_cells(s)]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    for label, entry in _entries(report):
        strength = entry.get("strength")
        comp = entry.get("compression") or []
        desc = ", ".join(f"{c.get('method')} ({_num(c.get('bits_per_weight'))} bits/weight, sparsity "
                         f"{_pct(c.get('sparsity'))})" for c in comp if isinstance(c, Mapping))
        if entry.get("method") or desc:
            out.append(f"\n- **{label}**: method {entry.get('method')}, strength {strength}" + (f"; {desc}" if desc else ""))
    flipped = _flipped(rows)
    out += ["", f"## Flipped questions ({len(flipped)}" + (f", first {MAX_FLIPPED}" if len(flipped) > MAX_FLIPPED else "") + ")",
            ""]
    if flipped:
        out += ["| child | task | doc_id | gold | parent | child |", "|---|---|---|---|---|---|"]
        for r in flipped[:MAX_FLIPPED]:
            cells = [str(r.get("child", "")), str(r.get("task")), str(r.get("doc_id")), str(r.get("gold"))[:80],
                     _answer(r, "P"), _answer(r, "C")]
            out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# plots (matplotlib Agg through Figure objects: no pyplot, no global backend switch)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float = 6.0, h: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


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


def _overall(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if entry.get("micro"):
        return entry["micro"]
    tasks = list((entry.get("tasks") or {}).values())
    return tasks[0] if len(tasks) == 1 else None


def plot_acc_vs_flips(report: Mapping[str, Any]) -> str | None:
    """Accuracy change vs flips, one point per child (Dutta et al. 2024, figure 1)."""
    pts = [(label, _overall(e), label == "noise floor") for label, e in _entries(report)]
    pts = [(lab, s, floor) for lab, s, floor in pts if s and s.get("delta_acc") is not None and s.get("flips") is not None]
    if not pts:
        return None
    fig = _figure()
    ax = fig.subplots()
    for lab, s, floor in pts:
        x, y = 100 * s["delta_acc"], 100 * s["flips"]
        ax.scatter([x], [y], marker="x" if floor else "o", color="grey" if floor else None)
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("accuracy change, child − parent (points)")
    ax.set_ylabel("flips (% of questions)")
    ax.set_title("Accuracy change vs flips")
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
    """Δacc and flips against strength, one line per method that was swept."""
    groups = sweep_groups(report)
    if not groups:
        return None
    fig = _figure(10.0, 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    for key, pts in groups.items():
        xs = [p[0] for p in pts]
        ax1.plot(xs, [100 * (p[2].get("delta_acc") or 0.0) for p in pts], marker="o", label=key)
        ax2.plot(xs, [100 * (p[2].get("flips") or 0.0) for p in pts], marker="o", label=key)
    ax1.set_ylabel("accuracy change (points)")
    ax2.set_ylabel("flips (% of questions)")
    names = {key.rsplit("(", 1)[-1].rstrip(")") for key in groups}
    xlabel = next(iter(names)) if len(names) == 1 else "strength"
    for ax in (ax1, ax2):
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    ax1.axhline(0.0, color="grey", lw=0.5)
    fig.suptitle("Sweeps: accuracy change and flips vs strength")
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
    r = pearson([p[2] for p in pts], [p[3] for p in pts])
    fig = _figure()
    ax = fig.subplots()
    for child in dict.fromkeys(p[0] for p in pts):
        mine = [p for p in pts if p[0] == child]
        ax.scatter([p[2] for p in mine], [100 * p[3] for p in mine], label=child.lstrip("_") or child)
    ax.set_xlabel("mean KL(parent ‖ child), one point per child and task")
    ax.set_ylabel("flips (% of questions)")
    ax.set_title("Flips vs KL" + (f" (Pearson r = {r:.2f}, {len(pts)} points)" if r is not None else ""))
    ax.legend(fontsize=8)
    return _png(fig)


def plot_margin_deciles(report: Mapping[str, Any]) -> str | None:
    """Flip rate per decile of the parent's top margin, one line per child."""
    fig, drawn = _figure(), False
    ax = fig.subplots()
    for label, e in _entries(report):
        s = _overall(e)
        dec = ((s or {}).get("margin") or {}).get("deciles") or []
        xs = [d["bin"] + 1 for d in dec if d.get("flip_rate") is not None]
        ys = [100 * d["flip_rate"] for d in dec if d.get("flip_rate") is not None]
        if xs:
            # matplotlib hides legend labels starting with "_" (lm-eval's folder names do: __tmp__model)
            ax.plot(xs, ys, marker="o", label=label.lstrip("_") or label, color="grey" if label == "noise floor" else None)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("decile of the parent's top margin (1 = least confident)")
    ax.set_ylabel("flip rate (%)")
    ax.set_title("Flip rate by the parent's top-margin decile")
    ax.legend(fontsize=8)
    return _png(fig)


PLOTS = (
    ("Accuracy change vs flips", plot_acc_vs_flips),
    ("Sweeps", plot_sweeps),
    ("Flips vs KL", plot_flips_vs_kl),
    ("Flip rate vs the parent's top margin", plot_margin_deciles),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}
tr.floor td{color:#777}.meta{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def report_html(report: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """report.html: one self-contained page (inline CSS, base64 PNG plots, no external resources)."""
    rows = list(rows)
    e = html.escape
    parent = report.get("parent") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>flipcheck report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>flipcheck report</h1>",
        f'<p class="meta">parent <code>{e(str(parent.get("source")))}</code> (fingerprint '
        f'<code>{e(str(parent.get("fingerprint")))}</code>)<br>settings: {e(_settings_line(report))}<br>'
        f'created {e(str(report.get("created")))} by flipcheck {e(str(report.get("flipcheck_version")))}</p>',
        "<p>Flips: questions whose correctness changed (c→i: parent right, child wrong; i→c: the reverse), as a "
        "fraction of all questions. Answer changes also count wrong → different wrong. Δacc in points with a paired "
        "bootstrap 95% interval. KL: mean KL(parent ‖ child) over the options per question, and over the vocabulary "
        "per scored token.</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADERS) + "</tr>",
    ]
    for label, entry in _entries(report):
        cls = ' class="floor"' if label == "noise floor" else ""
        for task, s in _summaries(entry):
            cells = [f"<td>{e(label)}</td>", f"<td>{e(task)}</td>", f'<td class="num">{e(str(s.get("n", "-")))}</td>']
            cells += [f'<td class="num">{e(c)}</td>' for c in table_cells(s)]
            parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    for title, fn in PLOTS:
        try:
            png = fn(report)
        except Exception as err:  # a plot must never cost the user the report
            log.warning("plot %r failed: %s", title, err)
            png = None
        if png:
            parts.append(f"<h2>{e(title)}</h2>")
            parts.append(f'<img alt="{e(title)}" src="data:image/png;base64,{png}">')
    flipped = _flipped(rows)
    head = f"Flipped questions ({len(flipped)}" + (f", first {MAX_FLIPPED}" if len(flipped) > MAX_FLIPPED else "") + ")"
    parts.append(f"<h2>{e(head)}</h2>")
    if flipped:
        parts.append("<table><tr><th>child</th><th>task</th><th>doc_id</th><th>gold</th><th>parent</th>"
                     "<th>child</th><th>question (end of prompt)</th></tr>")
        for r in flipped[:MAX_FLIPPED]:
            q = str(r.get("question") or "")[-200:]
            parts.append(
                "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
                    r.get("child", ""), r.get("task"), r.get("doc_id"), str(r.get("gold"))[:80],
                    _answer(r, "P"), _answer(r, "C"), q)) + "</tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
