"""Run folders: report.json round trip, samples.jsonl, markdown, self-contained HTML, terminal table."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from rich.console import Console

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.report import (
    MAX_FLIPPED,
    child_entry,
    flips_kl_points,
    load_report,
    load_rows,
    new_report,
    plot_sweeps,
    render_table,
    report_html,
    report_markdown,
    sweep_groups,
    write_report,
)
from flipcheck.evaluation.samples import aggregate, build_rows, summarize_task


def _mc(doc_id: int, lls, gold: int) -> dict:
    pred = int(np.argmax(lls))
    return {
        "doc_id": doc_id, "target": gold, "arguments": [(f"Question {doc_id}?", f" option {j}") for j in range(len(lls))],
        "filtered_resps": [(float(x), False) for x in lls], "metrics": ["acc"], "acc": float(pred == gold),
    }


def _gen(doc_id: int, out: str, gold: str) -> dict:
    return {
        "doc_id": doc_id, "target": gold, "arguments": [(f"{doc_id} + 1 =", {"until": ["\n"]})], "resps": [[out]],
        "filtered_resps": [out], "metrics": ["exact_match"], "exact_match": float(out.strip() == gold),
    }


def _child(name: str, sigma: float, rng: np.random.Generator, base: np.ndarray, golds: list[int]):
    ll_c = base + sigma * rng.standard_normal(base.shape) * 4
    parent_mc = [_mc(i, base[i], golds[i]) for i in range(len(base))]
    child_mc = [_mc(i, ll_c[i], golds[i]) for i in range(len(base))]
    parent_gen = [_gen(i, str(i + 1), str(i + 1)) for i in range(5)]
    child_gen = [_gen(i, str(i + 1) if i >= round(10 * sigma) else "0", str(i + 1)) for i in range(5)]
    rows_by_task = {
        "task_a": build_rows("task_a", parent_mc, child_mc),
        "task_b": build_rows("task_b", parent_gen, child_gen),
    }
    summaries = {t: summarize_task(r, n_boot=200) for t, r in rows_by_task.items()}
    agg = aggregate(summaries, rows_by_task, n_boot=200)
    entry = child_entry(
        name, summaries, micro=agg["micro"], macro=agg["macro"], source=f"/models/{name}", fingerprint=f"fp-{name}",
        method="noise", settings={"sigma": sigma, "seed": 0}, strength={"sigma": sigma},
        compression=[{"method": "noise", "bits_per_weight": 32.0, "sparsity": 0.0}],
    )
    rows = [{"child": name, **r.to_dict()} for t in rows_by_task for r in rows_by_task[t]]
    return entry, rows


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 4)) * 2
    golds = [int(g) for g in rng.integers(0, 4, 40)]
    c1, r1 = _child("noise-0.1", 0.1, rng, base, golds)
    c2, r2 = _child("noise-0.3", 0.3, rng, base, golds)
    floor, _ = _child("floor", 0.0, rng, base, golds)
    report = new_report(
        {"source": "/models/parent", "fingerprint": "fp-parent"},
        {"tasks": ["task_a", "task_b"], "num_fewshot": None, "limit": None, "seed": 0, "batch_size": 8,
         "dtype": "float32", "device": "cpu"},
        [c1, c2],
        noise_floor=floor,
    )
    return report, r1 + r2


def test_report_round_trips_and_samples_are_equal(synthetic, tmp_path):
    report, rows = synthetic
    folder = write_report(tmp_path / "run", report, rows)
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.json", "report.md", "samples.jsonl"]
    assert load_report(folder) == json.loads(json.dumps(report))
    assert load_report(folder / "report.json")["children"][1]["strength"] == {"sigma": 0.3}
    assert load_rows(folder) == json.loads(json.dumps(rows))
    assert len(load_rows(folder)) == 2 * (40 + 5)


def test_html_is_self_contained_with_embedded_plots(synthetic, tmp_path):
    report, rows = synthetic
    write_report(tmp_path, report, rows)
    page = (tmp_path / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 4  # acc vs flips, sweep curves, flips vs KL, flip rate per margin decile
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text.lower()
    for ref in ("<script", "<link", "url(", "@import", "href="):
        assert ref not in text.lower()
    assert "noise-0.3" in page and "task_a" in page and "noise floor" in page


def test_tables_show_hand_checkable_figures(synthetic):
    report, rows = synthetic
    c1 = report["children"][0]["tasks"]["task_a"]
    flipped_a = [r for r in rows if r["child"] == "noise-0.1" and r["task"] == "task_a" and r["correct_P"] != r["correct_C"]]
    assert c1["flips"] == pytest.approx(len(flipped_a) / 40)
    md = report_markdown(report, rows)
    assert f"| noise-0.1 | task_a (acc) | 40 | {100 * c1['acc_P']:.1f}% | {100 * c1['acc_C']:.1f}% |" in md
    assert f"{100 * c1['flips']:.1f}% ({100 * c1['flips_c2i']:.1f}% / {100 * c1['flips_i2c']:.1f}%)" in md
    n_flipped = sum(r["correct_P"] != r["correct_C"] for r in rows)
    assert f"## Flipped questions ({n_flipped})" in md
    # generative flips of the sigma=0.3 child: docs 0-2 answered "0" instead of the right sum
    assert "| noise-0.3 | task_b | 0 | 1 | ✓ 1 | ✗ 0 |" in md
    console = Console(record=True, width=260)
    console.print(render_table(report))
    out = console.export_text()
    for needle in ("noise-0.1", "noise-0.3", "noise floor", "task_a", "task_b", "micro (all questions)",
                   f"{100 * c1['flips']:.1f}%"):
        assert needle in out


def test_flipped_list_is_capped(synthetic):
    report, _ = synthetic
    many = [{"child": "c", "task": "t", "doc_id": i, "gold": 0, "pred_P": 0, "pred_C": 1, "correct_P": True,
             "correct_C": False} for i in range(MAX_FLIPPED + 50)]
    page = report_html(report, many)
    assert f"first {MAX_FLIPPED}" in page
    assert page.count("<td>c</td>") == MAX_FLIPPED
    md = report_markdown(report, many)
    assert md.count("\n| c | t |") == MAX_FLIPPED


def test_sweeps_and_scatter_points(synthetic):
    report, _ = synthetic
    groups = sweep_groups(report)
    assert list(groups) == ["noise (sigma)"]
    assert [p[0] for p in groups["noise (sigma)"]] == [0.1, 0.3]
    pts = flips_kl_points(report)
    assert {(c, t) for c, t, _, _ in pts} == {("noise-0.1", "task_a"), ("noise-0.3", "task_a")}  # task_b: no KL
    single = dict(report, children=report["children"][:1])
    assert plot_sweeps(single) is None  # one point is not a sweep


def test_load_report_refuses_other_files(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": {"arc_easy": {"acc": 0.5}}}))
    with pytest.raises(FlipcheckError) as err:
        load_report(other)
    assert "is not a flipcheck report" in str(err.value) and "\n" not in str(err.value)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(FlipcheckError, match="is not a flipcheck report"):
        load_report(garbage)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema": "flipcheck.report", "version": 99, "children": []}))
    with pytest.raises(FlipcheckError, match="newer flipcheck"):
        load_report(newer)
    with pytest.raises(FlipcheckError, match="no such report"):
        load_report(tmp_path / "missing")
