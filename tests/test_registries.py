"""A new engine and a new executor are each one file and one registration (tests/fakes/): both run a
sweep end to end, and give the answers the built-in ones give."""

from __future__ import annotations

import json
import math

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines import check_engine, engine_names
from flipcheck.executors import ExecutorOptions, executor_names
from flipcheck.models import save_model
from flipcheck.orchestrate.recipe import sweep

TASKS = ["tiny_letters", "tiny_sentences", "tiny_sums"]
KEYS = ("child", "task", "doc_id", "pred_P", "pred_C", "correct_P", "correct_C")


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    out = tmp_path_factory.mktemp("reg_parent") / "parent"
    save_model(tiny_model, tiny_tokenizer, out, {"parent": None})
    return out


def _sweep(parent_dir, task_dir, root, **kw):
    report = sweep(str(parent_dir), "noise", {"sigma": [0.05, 0.2]}, tasks=TASKS, include_path=str(task_dir),
                   out=root / "run", cache_dir=root / "cache", batch_size=8, **kw)
    rows = [json.loads(line) for line in (root / "run" / "samples.jsonl").read_text().splitlines()]
    return report, rows


@pytest.fixture(scope="module")
def builtin(parent_dir, task_dir, tmp_path_factory):
    return _sweep(parent_dir, task_dir, tmp_path_factory.mktemp("builtin"))


def _same_answers(a_rows, b_rows, tol=1e-4):
    assert len(a_rows) == len(b_rows) > 0
    for a, b in zip(a_rows, b_rows, strict=True):
        assert {k: a.get(k) for k in KEYS} == {k: b.get(k) for k in KEYS}
        if a.get("kl_options") is not None:
            assert math.isclose(a["kl_options"], b["kl_options"], rel_tol=tol, abs_tol=1e-6)


def test_a_registered_engine_scores_a_sweep(parent_dir, task_dir, tmp_path, builtin):
    from fakes.sequence_engine import SequenceEngine

    assert "one-sequence" in engine_names() and check_engine("one-sequence") == "one-sequence"
    report, rows = _sweep(parent_dir, task_dir, tmp_path, engine="one-sequence")
    for entry in report["children"]:
        assert entry["engine"]["name"] == "one-sequence"  # the report names the engine that scored it
    _same_answers(builtin[1], rows)  # the same weights, one sequence at a time: the same answers
    assert SequenceEngine.__name__ and report["parent"]["engine"]["name"] == "one-sequence"


def test_a_registered_executor_runs_a_sweep(parent_dir, task_dir, tmp_path, builtin):
    from fakes.reversed_executor import ReversedExecutor

    assert "reversed" in executor_names()
    ReversedExecutor.ran.clear()
    report, rows = _sweep(parent_dir, task_dir, tmp_path, executor=ExecutorOptions("reversed"))
    assert ReversedExecutor.ran == ["noise sigma=0.2", "noise sigma=0.05"]  # it ran them last first
    assert [c["name"] for c in report["children"]] == ["noise sigma=0.05", "noise sigma=0.2"]  # reported in order
    assert report["executor"]["name"] == "reversed"
    _same_answers(builtin[1], rows)


def test_unknown_names_list_what_is_registered():
    with pytest.raises(FlipcheckError, match="allowed are auto, transformers, llama.cpp, vllm"):
        check_engine("nope")
    with pytest.raises(FlipcheckError, match="allowed are local, ray"):
        ExecutorOptions("nope")
