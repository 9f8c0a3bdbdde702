"""Figures as text: percentages, labels, headlines, table cells and the terminal table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.table import Table

from flipcheck.files import pct


def signed(x: Any) -> str:
    """+1.2 (a change in percentage points, no unit)."""
    return "-" if x is None else f"{100 * x:+.1f}"


def pts_text(x: Any) -> str:
    """A change in accuracy in percentage points, with a real minus sign: −0.7 pts."""
    return "-" if x is None else f"{100 * x:+.1f} pts".replace("-", "−")


def num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def num3(x: Any) -> str:
    return "-" if x is None else f"{x:.2g}" if abs(x) < 0.01 else f"{x:.3g}"


def pvalue(p: Any) -> str:
    if p is None:
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def mean_of(block: Any) -> Any:
    return block.get("mean") if isinstance(block, Mapping) else None


def labelled_entries(report: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, entry) for every child and every noise-floor row (labels starting "noise floor")."""
    out = [(str(c.get("name")), c) for c in report.get("children") or []]
    for e in floor_entries(report):
        name = str(e.get("name") or "")
        out.append((name if is_floor(name) else "noise floor", e))
    return out


def has_questions(report: Mapping[str, Any]) -> bool:
    """Whether any child or floor row was scored on questions (a report of text corpora or judged answers
    alone has none, and shows no per-task table or flipped questions)."""
    return any(entry.get("tasks") for _, entry in labelled_entries(report)) or not report.get("children")


def floor_entries(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The noise-floor rows: a list since report version 2 (version 1 had one entry or null)."""
    floor = report.get("noise_floor")
    if not floor:
        return []
    return [floor] if isinstance(floor, Mapping) else [e for e in floor if e]


def is_floor(label: str) -> bool:
    return label.startswith("noise floor")


def floor_max(report: Mapping[str, Any], key: str, task: str | None = None) -> float | None:
    """The largest figure `key` over the noise-floor rows (of `task`, else over all questions)."""
    values = []
    for e in floor_entries(report):
        s = (e.get("tasks") or {}).get(task) if task is not None else overall_summary(e)
        v = (s or {}).get(key)
        v = mean_of(v) if isinstance(v, Mapping) else v
        if v is not None:
            values.append(float(v))
    return max(values) if values else None


def labelled_summaries(entry: Mapping[str, Any], *, detail: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(label, summary) per named task or group, plus micro; labels name the metric and filter.

    With `detail`, a task that reports acc_norm also gets a row under its other metric.
    """
    rows = list((entry.get("tasks") or {}).items())
    if len(rows) > 1 and entry.get("micro"):
        rows.append(("micro (all questions)", entry["micro"]))
    out = []
    for task, s in rows:
        out.append((task_label(task, s), s))
        for metric, block in (s.get("by_metric") or {}).items() if detail else ():
            if metric != s.get("metric") and isinstance(block, Mapping):
                out.append((f"{task} ({metric})", {**s, **block}))
    return out


def task_label(task: str, s: Mapping[str, Any]) -> str:
    """A task's name with the metric its figures use and, for generative tasks, the lm-eval filter."""
    extra = [str(s["metric"])] if s.get("metric") else []
    if s.get("filter") not in (None, "none"):
        extra.append(f"filter {s['filter']}")
    return f"{task} ({', '.join(extra)})" if extra else task


def table_cells(s: Mapping[str, Any]) -> list[str]:
    """acc P, acc C, Δacc [CI], flips (c→i / i→c), answer changes, KL options, KL vocab, top-1."""
    ci = s.get("delta_acc_ci")
    delta = signed(s.get("delta_acc"))
    if ci and s.get("delta_acc") is not None:
        delta += f" [{signed(ci[0])}, {signed(ci[1])}]"
    flips = pct(s.get("flips"))
    if s.get("flips") is not None:
        flips += f" ({pct(s.get('flips_c2i'))} / {pct(s.get('flips_i2c'))})"
    return [
        pct(s.get("acc_P")),
        pct(s.get("acc_C")),
        delta,
        flips,
        pct(s.get("answer_changes")),
        num(mean_of(s.get("kl_options"))),
        num(mean_of(s.get("kl_vocab"))),
        pct(s.get("top1_agree")),
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
    caption = "; ".join(([f"vocabulary KL: {kl_method_label(report)}"] if kl_method_label(report) else [])
                        + ([f"engines: {engines_label(report)}"] if engines_label(report) else [])
                        + nonfinite_notes(report) + failed_notes(report)) or None
    table = Table(title=f"flipcheck: children vs parent {parent}", caption=caption, box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("child / task", justify="left", overflow="fold", min_width=25 if compact else 10)
    heads = (
        ["n", "acc P→C", "Δacc", "flips", "KL opt", "KL voc"]
        if compact
        else ["n", "acc P", "acc C", "Δacc pts [95% CI]", "flips (c→i / i→c)", "answer changes",
              "KL options", "KL vocab", "top-1 agree"]
    )
    for h in heads:
        table.add_column(h, justify="right", no_wrap=True)
    for label, entry in labelled_entries(report):
        dim = is_floor(label)
        table.add_row(f"[bold]{label}[/]", style="dim" if dim else None)
        for task, s in labelled_summaries(entry):
            if compact:
                cells = [
                    f"{pct(s.get('acc_P'))}→{pct(s.get('acc_C'))}".replace("%→", "→"),
                    signed(s.get("delta_acc")),
                    pct(s.get("flips")),
                    num3(mean_of(s.get("kl_options"))),
                    num3(mean_of(s.get("kl_vocab"))),
                ]
            else:
                cells = table_cells(s)
            name = "all (micro)" if compact and task.startswith("micro") else task
            table.add_row(f"  {name}", str(s.get("n", "-")), *cells, style="dim" if dim else None)
        table.add_section()
    return table


def overall_summary(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
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
    inner = [pts_text(delta)]
    ci = s.get("delta_acc_ci")
    if ci and None not in ci:
        inner.append(f"95% CI {signed(ci[0])} to {signed(ci[1])}".replace("-", "−"))
    if s.get("mcnemar_p") is not None:
        inner[-1] += f"; McNemar p = {pvalue(s['mcnemar_p'])}"
    text = f"accuracy {pct(s['acc_P'])} → {pct(s['acc_C'])} ({', '.join(inner)})"
    flips = s.get("flips")
    if flips is None:
        return text
    hidden = delta is not None and flips > 2 * abs(delta)
    text += f", {'yet' if hidden else 'and'} {pct(flips)} of answers flipped"
    if s.get("flips_c2i") is not None and s.get("flips_i2c") is not None:
        text += f" ({pct(s['flips_c2i'])} right → wrong, {pct(s['flips_i2c'])} wrong → right)"
    cl = s.get("clustered")
    if cl:  # beside the plain intervals: subtasks resampled (evaluation.clustered)
        text += (f"; clustered by {cl['clusters']} subtasks: Δacc 95% CI {signed(cl['delta_acc_ci'][0])} to "
                 f"{signed(cl['delta_acc_ci'][1])}, flips 95% CI {pct(cl['flips_ci'][0])} to {pct(cl['flips_ci'][1])}"
                 ).replace("-", "−")
        if cl.get("flips_ci_plain"):
            text += f" (questions independent: {pct(cl['flips_ci_plain'][0])} to {pct(cl['flips_ci_plain'][1])})"
    return text


def summary_line(report: Mapping[str, Any]) -> str | None:
    """One line over all children: how far accuracy moved against how many answers flipped."""
    overall = [overall_summary(c) for c in report.get("children") or []]
    overall = [s for s in overall if s and s.get("delta_acc") is not None and s.get("flips") is not None]
    if not overall:
        return None
    deltas = [abs(s["delta_acc"]) for s in overall]
    flips = [s["flips"] for s in overall]
    n = len(overall)
    if n == 1:
        text = f"1 child: accuracy moved by {100 * deltas[0]:.1f} points, while {pct(flips[0])} of answers flipped"
    else:
        text = (f"{n} children: accuracy moved by at most {100 * max(deltas):.1f} points, while "
                f"{100 * min(flips):.1f}–{pct(max(flips))} of answers flipped")
    floor = floor_max(report, "flips")
    if floor is not None:
        text += f" (noise floor: {'up to ' if len(floor_entries(report)) > 1 else ''}{pct(floor)})"
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
                 f"{pct(c.get('sparsity'))} zeros" if c.get("sparsity") else None]
        stats = ", ".join(x for x in stats if x)
        if stats:
            steps.append(f"{c.get('method')}: {stats}" if len(entry.get("compression") or []) > 1 else stats)
    return " · ".join(x for x in (head, "; ".join(steps)) if x)


def side_value(row: Mapping[str, Any], key: str, side: str) -> Any:
    """A row's pred_/correct_ value under its headline metric (the length-normalised one for acc_norm)."""
    if row.get("headline") == "acc_norm" and row.get(f"{key}_norm_{side}") is not None:
        return row.get(f"{key}_norm_{side}")
    return row.get(f"{key}_{side}")


def flipped_rows(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if bool(side_value(r, "correct", "P")) != bool(side_value(r, "correct", "C"))]


def _option(row: Mapping[str, Any], value: Any) -> str:
    """An option index with its text ("2: green") where the row has the options; the value otherwise."""
    choices = row.get("choices")
    if isinstance(value, int) and not isinstance(value, bool) and choices and 0 <= value < len(choices):
        return f"{value}: {choices[value]}"
    return str(value)


def answer_text(row: Mapping[str, Any], side: str) -> str:
    mark = "✓" if side_value(row, "correct", side) else "✗"
    return f"{mark} {_option(row, side_value(row, 'pred', side))[:120]}"


def gold_text(row: Mapping[str, Any]) -> str:
    return _option(row, row.get("gold"))[:80]


def flip_direction(row: Mapping[str, Any]) -> str:
    return "c→i" if side_value(row, "correct", "P") else "i→c"


def settings_items(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in (report.get("settings") or {}).items():
        if v is None:
            continue
        if isinstance(v, list | tuple):
            v = ", ".join(str(x) for x in v)
        out.append((str(k), str(v)))
    return out


def engine_text(ident: Mapping[str, Any] | None) -> str:
    """``llama.cpp 0.3.36 Q4_K_M`` / ``transformers 5.17.0 float32 (dequantized GGUF Q4_K_M)``."""
    if not ident:
        return "?"
    text = " ".join(str(ident[k]) for k in ("name", "version", "dtype") if ident.get(k))
    if ident.get("dequantized_from"):
        text += f" (dequantized {ident['dequantized_from']})"
    if ident.get("url"):  # an already served model
        text += f" {ident.get('model')} at {ident['url']} (top-{ident.get('logprobs')} log-probs)"
    return text


def engines_label(report: Mapping[str, Any]) -> str | None:
    """Which engine scored each model: ``parent: X; child a: Y`` (one phrase when all are the same)."""
    parent = (report.get("parent") or {}).get("engine")
    if not parent:
        return None
    per = [("parent", engine_text(parent))] + [
        (str(c.get("name")), engine_text(c.get("engine"))) for c in report.get("children") or [] if c.get("engine")
    ]
    if len({t for _, t in per}) == 1:
        return f"{per[0][1]} (every model)"
    return "; ".join(f"{name}: {text}" for name, text in per)


def kl_method_label(report: Mapping[str, Any]) -> str | None:
    """How the report's vocabulary KL was computed ("exact", or "top-K + tail lower bound, K=64")."""
    method = report.get("kl_method")
    return str(method.get("label") or method.get("name")) if isinstance(method, Mapping) else None


def failed_notes(report: Mapping[str, Any]) -> list[str]:
    """One line per child that failed (``report["failed"]``, e.g. a Ray task that failed twice)."""
    return [f"child {f.get('name')} FAILED after {f.get('attempts', 1)} attempt(s): {f.get('reason')}"
            for f in report.get("failed") or [] if f.get("status") == "failed"]


def nonfinite_notes(report: Mapping[str, Any]) -> list[str]:
    """One line per child and task whose parent or child had NaN/inf logits at scored positions."""
    out = []
    for label, entry in labelled_entries(report):
        for task, s in (entry.get("tasks") or {}).items():
            nf = s.get("nonfinite")
            if isinstance(nf, Mapping) and any(nf.values()):
                out.append(f"{label} / {task}: NaN/inf logits at {nf.get('child', 0)} scored positions of the child "
                           f"and {nf.get('parent', 0)} of the parent; its KL counts as infinite")
    return out


def settings_line(report: Mapping[str, Any]) -> str:
    return " · ".join(f"{k}={v}" for k, v in settings_items(report))


EXPLAIN = (
    "Flips: questions whose correctness changed (c→i: parent right, child wrong; i→c: the reverse), as a "
    "fraction of all questions; flips are never below |Δacc|, and a child can keep its accuracy while flipping "
    "many answers. Answer changes also count wrong → different wrong. Δacc in points with a paired bootstrap 95% "
    "interval. KL: mean over questions of KL(parent ‖ child) over the options, and mean over scored tokens over "
    "the vocabulary. Top-1 agree: scored tokens where parent and child rank the same token first."
)


def group_rows(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(child label, group, its summary) for every named group that has subtasks beneath it."""
    return [(label, task, s) for label, entry in labelled_entries(report) for task, s in (entry.get("tasks") or {}).items()
            if isinstance(s, Mapping) and s.get("subtasks")]


def group_note(s: Mapping[str, Any]) -> str:
    how = ("each weighted by its share of the questions" if s.get("aggregation") != "weighted mean of subtasks"
           else "averaged with the group's weights")
    cl = s.get("clustered")
    extra = (f"; clustered by subtask: flips 95% CI {pct(cl['flips_ci'][0])} to {pct(cl['flips_ci'][1])}, "
             f"Δacc {signed(cl['delta_acc_ci'][0])} to {signed(cl['delta_acc_ci'][1])}" if cl else "")
    return f"{len(s['subtasks'])} subtasks, {how}{extra}"
