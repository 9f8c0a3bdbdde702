"""Slices of the damage: flips and Δacc by category/subtask, prompt-length tercile and parent-margin decile,
the questions with the largest KL, and where generations first differ: figures by hand, counts that add
up, and the report sections (md, html; never the terminal table)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from rich.console import Console

from flipcheck.evaluation import metrics as M
from flipcheck.evaluation.report import child_entry, new_report, render_table, report_html, report_markdown
from flipcheck.evaluation.samples import SampleRow, build_rows, summarize_group, summarize_task


def test_wilson_interval_by_hand():
    lo, hi = M.proportion_ci(0, 10)
    z = 1.959963984540054
    assert lo == 0.0 and hi == pytest.approx(2 * (z * z / 20) / (1 + z * z / 10))  # k = 0: [0, 2·centre]
    assert hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = M.proportion_ci(5, 10)
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    assert M.proportion_ci(10, 10)[1] == 1.0 and M.proportion_ci(0, 0) is None


def test_quantile_bins_and_first_difference_by_hand():
    edges, bins = M.quantile_bins([10, 20, 30, 40, 50, 60], 3)
    assert edges.tolist() == pytest.approx([10, 80 / 3, 130 / 3, 60])
    assert bins.tolist() == [0, 0, 1, 1, 2, 2]
    _, tied = M.quantile_bins([1, 1, 1, 1, 5], 4)  # ties share a bin; the bins the run spans stay empty
    assert tied.tolist() == [3, 3, 3, 3, 3] or len(set(tied[:4].tolist())) == 1
    assert M.first_difference("abc", "abd") == 2 and M.first_difference("ab", "abc") == 2
    assert M.first_difference("x", "y") == 0 and M.first_difference("same", "same") is None
    assert M.first_difference(None, "a") is None


def _row(i, cp, cc, category, chars, margin, kl, task="t"):
    return SampleRow(task=task, doc_id=i, gold=0, pred_P=0 if cp else 1, pred_C=0 if cc else 2, correct_P=cp,
                     correct_C=cc, kl_options=kl, kl_vocab=None, top1_agree=None, margin_P=margin,
                     choices=["w", "x", "y", "z"], question=f"question {i}", category=category, prompt_chars=chars)


ROWS = [  # i, correct P, correct C, category, prompt characters, parent margin, KL over options
    (0, True, False, "a", 10, 0.1, 0.5),
    (1, True, True, "a", 20, 0.2, 0.1),
    (2, False, True, "b", 30, 0.3, 0.2),
    (3, True, True, "b", 40, 0.4, 0.05),
    (4, True, False, "b", 50, 0.5, 0.9),
    (5, False, False, None, 60, None, None),
]


def _by(block):
    return {s["slice"]: s for s in block["slices"]}


def test_slices_by_hand():
    s = summarize_task([_row(*r) for r in ROWS], n_boot=200)
    cat = s["slices"]["category"]
    assert cat["by"] == "category" and list(_by(cat)) == ["(none)", "a", "b"]
    a, b, none = _by(cat)["a"], _by(cat)["b"], _by(cat)["(none)"]
    assert (a["n"], a["n_flips"], a["flips"], a["acc_P"], a["acc_C"], a["delta_acc"]) == (2, 1, 0.5, 1.0, 0.5, -0.5)
    assert a["flips_ci"] == pytest.approx(list(M.proportion_ci(1, 2))) and a["flips_c2i"] == 0.5
    assert (b["n"], b["n_flips"], b["delta_acc"]) == (3, 2, 0.0)
    assert b["flips"] == pytest.approx(2 / 3) and b["flips_c2i"] == pytest.approx(1 / 3) == b["flips_i2c"]
    assert (none["n"], none["n_flips"], none["delta_acc_ci"]) == (1, 0, [0.0, 0.0])

    length = s["slices"]["prompt_length"]
    assert length["unit"] == "characters"
    short, medium, long_ = (_by(length)[k] for k in ("short", "medium", "long"))
    assert [short["n"], medium["n"], long_["n"]] == [2, 2, 2]
    assert (short["delta_acc"], medium["delta_acc"], long_["delta_acc"]) == (-0.5, 0.5, -0.5)
    assert (short["lo"], short["hi"]) == pytest.approx((10, 80 / 3))
    lo, hi = medium["delta_acc_ci"]
    assert -0.5 <= lo <= 0.5 <= hi <= 1.0  # the paired bootstrap of (row 2: +1, row 3: 0)

    margin = _by(s["slices"]["margin"])
    assert margin["(no margin)"]["n"] == 1 and margin["d1"]["n"] == 1 and margin["d1"]["n_flips"] == 1
    assert margin["d10"]["n"] == 1 and margin["d10"]["n_flips"] == 1  # row 4: the largest margin, flipped
    for kind in ("category", "prompt_length", "margin"):  # every slicing covers the task exactly once
        assert sum(x["n"] for x in s["slices"][kind]["slices"]) == s["n"] == 6
        assert sum(x["n_flips"] for x in s["slices"][kind]["slices"]) == round(s["flips"] * 6) == 3

    top = s["top_kl"]
    assert [e["doc_id"] for e in top] == [4, 0, 2, 1, 3]  # by KL, row 5 (no KL) left out
    assert [e["flipped"] for e in top] == [True, True, True, False, False]
    assert top[0] == {**top[0], "kl": 0.9, "kl_of": "options", "answer_P": "w", "answer_C": "y", "gold": "w",
                      "correct_P": True, "correct_C": False, "question": "question 4"}
    assert s["first_difference"] is None


def test_top_kl_keeps_twenty_and_generative_first_difference():
    rows = [_row(i, True, True, None, None, 0.5, kl=i / 100) for i in range(25)]
    s = summarize_task(rows, n_boot=50)
    assert [e["doc_id"] for e in s["top_kl"]] == list(range(24, 4, -1))
    assert s["slices"]["category"] is None and s["slices"]["prompt_length"] is None

    def gen(i, a, b, em_p, em_c):
        return SampleRow(task="g", doc_id=i, gold="1", pred_P=a, pred_C=b, correct_P=em_p, correct_C=em_c,
                         kl_options=None, kl_vocab=None, top1_agree=None, margin_P=None, output_P=a, output_C=b,
                         kind="generate_until", first_diff_char=M.first_difference(a, b), prompt_chars=5)

    g = summarize_task([gen(0, "abc", "abd", True, False), gen(1, "abc", "abc", True, True),
                        gen(2, "ab", "abc", False, False), gen(3, "x", "y", False, True)], n_boot=50)
    assert g["first_difference"] == {"unit": "characters", "n": 4, "identical": 1, "differ": 3, "median": 2.0,
                                     "mean": pytest.approx(4 / 3), "min": 0, "max": 2}
    assert g["slices"]["margin"] is None and g["top_kl"] == []  # no KL measured: nothing to rank
    assert g["slices"]["prompt_length"] is None  # every prompt 5 characters long: nothing to tell apart


def test_group_slices_by_subtask_and_rows_read_category_and_prompt_length():
    rows_a = [_row(i, True, i % 2 == 0, None, 10 + i, 0.1 * i, 0.1, task="g_a") for i in range(4)]
    rows_b = [_row(i, False, i == 0, None, 20 + i, 0.1 * i, 0.2, task="g_b") for i in range(3)]
    leaf = {"g_a": summarize_task(rows_a, n_boot=50), "g_b": summarize_task(rows_b, n_boot=50)}
    group = summarize_group("g", {"g_a": rows_a, "g_b": rows_b}, leaf, None, n_boot=50)
    sub = group["slices"]["category"]
    assert sub["by"] == "subtask" and [(x["slice"], x["n"], x["n_flips"]) for x in sub["slices"]] == [
        ("g_a", 4, 2), ("g_b", 3, 1)]
    assert len(group["top_kl"]) == 7 and "top_kl" not in group["subtasks"]["g_a"]  # listed once, at the group
    one = summarize_task([_row(i, True, False, "same", 10, 0.1, 0.1) for i in range(3)], n_boot=20)
    assert one["slices"]["category"] is None  # a single category is no slicing

    def sample(doc_id, lls, acc, doc):
        return {"doc_id": doc_id, "target": 0, "arguments": [("Question: where?", f" {c}") for c in "AB"],
                "filtered_resps": [(x, False) for x in lls], "metrics": ["acc"], "acc": acc, "doc": doc}

    docs = [{"subject": "geography"}, {"category": "science", "subject": "physics"}, {"text": "no field"}]
    rows = build_rows("t", [sample(i, [-1.0, -2.0], 1.0, d) for i, d in enumerate(docs)],
                      [sample(i, [-2.0, -1.0], 0.0, d) for i, d in enumerate(docs)])
    assert [r.category for r in rows] == ["geography", "science", None]  # category before subject
    assert [r.prompt_chars for r in rows] == [len("Question: where?")] * 3


def _report():
    rows = [_row(*r) for r in ROWS]
    s = summarize_task(rows, n_boot=100)
    entry = child_entry("noisy", {"t": s}, method="noise")
    report = new_report({"source": "/p", "fingerprint": "fp"}, {"tasks": ["t"]}, [entry])
    return report, [{"child": "noisy", **r.to_dict()} for r in rows]


def test_report_sections_in_md_and_html_not_in_the_terminal():
    report, rows = _report()
    md, page = report_markdown(report, rows), report_html(report, rows)
    assert "## Where the damage is" in md and "noisy / t: 6 questions: by category" in md
    assert "| by category | a |  | 2 | 100.0% | 50.0% | -50.0 [" in md
    assert "| prompt length | short | 10–27 chars | 2 |" in md and "| parent margin | (no margin) |  | 1 |" in md
    assert "The 5 questions with the largest KL over the options (3 of them flipped)" in md
    assert "| 4 | 0.9 | c→i | w | ✓ w | ✗ y | question 4 |" in md
    assert "<h2>Where the damage is</h2>" in page and '<table class="slices">' in page and "question 4" in page
    console = Console(record=True, width=200)
    console.print(render_table(report))
    terminal = console.export_text()
    assert "short" not in terminal and "category" not in terminal and "question 4" not in terminal


def test_a_real_run_has_slices_that_add_up(tiny_model, tiny_tokenizer, tmp_path):
    """flipcheck.evaluate on a task whose docs carry a subject and a generative task: report.json, md, html."""
    from conftest import ANIMALS, COLORS, GENERATE, MC_LETTERS, write_task
    from flipcheck.compressors.noise import NoiseConfig, apply_noise
    from flipcheck.models import save_model
    from flipcheck.orchestrate.evaluate import evaluate

    save_model(tiny_model, tiny_tokenizer, tmp_path / "parent", {"parent": None})
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=2.0, seed=3))
    save_model(child, tiny_tokenizer, tmp_path / "child", {"parent": str(tmp_path / "parent")})
    docs = [{"id": i, "animal": ANIMALS[i % 10], "choices": COLORS[i % 4: i % 4 + 4], "label": i % 4,
             "subject": "farm" if ANIMALS[i % 10] in ("cow", "sheep", "goat", "horse") else "other"} for i in range(30)]
    write_task(tmp_path / "tasks", "tiny_subjects", docs, MC_LETTERS)
    write_task(tmp_path / "tasks", "tiny_sums", [{"x": i % 10, "y": (3 * i) % 10} for i in range(8)], GENERATE)
    evaluate(str(tmp_path / "parent"), str(tmp_path / "child"), tasks="tiny_subjects,tiny_sums",
             include_path=str(tmp_path / "tasks"), cache_dir=tmp_path / "cache", batch_size=8, out=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    tasks = report["children"][0]["tasks"]
    mc, gen = tasks["tiny_subjects"], tasks["tiny_sums"]
    assert _by(mc["slices"]["category"]).keys() == {"farm", "other"}
    assert _by(mc["slices"]["category"])["farm"]["n"] == sum(d["subject"] == "farm" for d in docs)
    for s in (mc, gen):
        for kind in ("category", "prompt_length", "margin"):
            if s["slices"][kind]:
                assert sum(x["n"] for x in s["slices"][kind]["slices"]) == s["n"]
                assert sum(x["n_flips"] for x in s["slices"][kind]["slices"]) == round(s["flips"] * s["n"])
    assert mc["flips"] > 0 and len(mc["top_kl"]) == 20
    kls = [e["kl"] for e in mc["top_kl"]]
    mine = sorted((r["kl_options"] for r in rows if r["task"] == "tiny_subjects"), reverse=True)[:20]
    assert kls == pytest.approx(mine)
    gen_rows = [r for r in rows if r["task"] == "tiny_sums"]
    fd = gen["first_difference"]
    assert fd["n"] == len(gen_rows) and fd["identical"] + fd["differ"] == fd["n"]
    assert all((r["first_diff_char"] is None) == (r["output_P"] == r["output_C"]) for r in gen_rows)
    for r in gen_rows:
        if r["first_diff_char"] is not None:
            i = r["first_diff_char"]
            assert r["output_P"][:i] == r["output_C"][:i] and r["output_P"][i:i + 1] != r["output_C"][i:i + 1]
    assert all(r["prompt_chars"] and not math.isnan(r["prompt_chars"]) for r in rows)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Where the damage is" in md and "by category" in md
    assert "Where the damage is" in (tmp_path / "run" / "report.html").read_text()
