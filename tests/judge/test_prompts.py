"""Prompt sets: flipcheck's JSONL, MT-Bench's question.jsonl shape, the bundled demo set, and bad input."""

from __future__ import annotations

import json

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.judge.prompts import load_prompts


def write(tmp_path, rows, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_demo_set_is_bundled_with_categories_multi_turn_and_references():
    ps = load_prompts("demo")
    assert len(ps.prompts) == 12 and len({p.id for p in ps.prompts}) == 12
    assert sum(len(p.turns) > 1 for p in ps.prompts) >= 4 and sum(p.reference is not None for p in ps.prompts) >= 4
    assert all(p.category for p in ps.prompts)
    assert all(len(p.reference) == len(p.turns) for p in ps.prompts if p.reference)
    assert load_prompts("demo", limit=3).prompts == ps.prompts[:3]


def test_mt_bench_shape_and_our_shape(tmp_path):
    p = write(tmp_path, [
        {"question_id": 101, "category": "math", "turns": ["q1", "q2"], "reference": ["r1", "r2"]},
        {"turns": "one turn", "reference": "r"},
        {"prompt": "a single prompt column", "id": "x"},
        {"prompt": ["h4 turn 1", "h4 turn 2"], "prompt_id": 7, "category": "c", "reference": []},  # H4's mt_bench_prompts
    ])
    a, b, c, d = load_prompts(str(p)).prompts
    assert (d.id, d.turns, d.reference) == ("7", ("h4 turn 1", "h4 turn 2"), None)
    assert (a.id, a.category, a.turns, a.reference) == ("101", "math", ("q1", "q2"), ("r1", "r2"))
    assert (b.id, b.turns, b.reference) == ("2", ("one turn",), ("r",))
    assert (c.id, c.turns, c.reference, c.category) == ("x", ("a single prompt column",), None, None)


def test_content_hash_follows_the_content_not_the_bytes(tmp_path):
    rows = [{"id": "a", "turns": ["q"]}]
    h1 = load_prompts(str(write(tmp_path, rows, "a.jsonl"))).content_hash
    h2 = load_prompts(str(write(tmp_path, ['{"turns": ["q"],   "id": "a"}'], "b.jsonl"))).content_hash
    h3 = load_prompts(str(write(tmp_path, [{"id": "a", "turns": ["q?"]}], "c.jsonl"))).content_hash
    assert h1 == h2 != h3


@pytest.mark.parametrize("rows, message", [
    ([{"turns": []}], "non-empty list of user turns"),
    ([{"category": "x"}], "non-empty list of user turns"),
    ([{"turns": ["q"], "reference": 5}], "reference"),
    (["not json"], "not JSON"),
    ([{"id": 1, "turns": ["a"]}, {"id": 1, "turns": ["b"]}], "repeated: 1"),
    ([], "no prompts"),
])
def test_bad_prompt_files_fail_with_one_line(tmp_path, rows, message):
    with pytest.raises(FlipcheckError, match=message):
        load_prompts(str(write(tmp_path, rows)))


def test_missing_file_and_unloadable_dataset(tmp_path, monkeypatch):
    with pytest.raises(FlipcheckError, match="no such file"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FlipcheckError, match="could not load the dataset"):
        load_prompts("hf:no-such-org/no-such-set")
    with pytest.raises(FlipcheckError, match="expected hf:NAME"):
        load_prompts("hf:")
