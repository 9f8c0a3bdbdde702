"""A recipe's judge: section: every child of a sweep judged after its evaluation, Δscore set against flips and KL."""

from __future__ import annotations

import json

import judge_fixtures as jf
import pytest
import yaml

from flipcheck.errors import FlipcheckError
from flipcheck.gate import run_gate
from flipcheck.orchestrate.recipe import run_recipe
from flipcheck.recipes.schema import dump_recipe, parse_recipe

chat_tokenizer, chat_parent_dir, judge_dir, judge_server, own_cache = (
    jf.chat_tokenizer, jf.chat_parent_dir, jf.judge_dir, jf.judge_server, jf.own_cache)


def recipe_text(parent, tasks, url, model, prompts="demo") -> str:
    return yaml.safe_dump({
        "name": "judged-noise", "parent": str(parent),
        "evaluation": {"tasks": ["tiny_letters", "tiny_sentences"], "include_path": str(tasks), "batch_size": 8},
        "sweeps": [{"method": "noise", "grid": {"sigma": [0.02, 0.3, 1.0]}}],
        "judge": {"prompts": prompts, "url": url, "model": model, "max_new_tokens": 4, "limit": 3, "concurrency": 2},
        "gate": {"max_flips": "100%", "min_judge_delta": -0.5},
        "device": "cpu",
    })


def test_recipe_judges_every_child_and_correlates(chat_parent_dir, task_dir, judge_server, tmp_path):
    url, model = judge_server
    recipe = parse_recipe(recipe_text(chat_parent_dir, task_dir, url, model))
    assert parse_recipe(dump_recipe(recipe)) == recipe  # the judge section round-trips
    report = run_recipe(recipe, tmp_path / "run", cache_dir=tmp_path / "fc")
    children = report["children"]
    assert len(children) == 3 and all(c["judge"]["single"]["n"] >= 3 for c in children)
    assert all(c["judge"]["prompts"]["n"] == 3 and c["judge"]["prompts"]["source"] == "demo" for c in children)
    corr = report["judge_correlation"]
    assert [p["child"] for p in corr["points"]] == [c["name"] for c in children]
    assert all(p["flips"] is not None and p["kl"] is not None for p in corr["points"])
    # this judge gives every answer 7: Δscore is 0 for all, so no correlation exists, and the report says so
    assert corr["r_flips"] is None and corr["n_flips"] == 3
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["judge_correlation"] == json.loads(json.dumps(corr))
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Judged score change vs flips and KL" in page and "data:image/png;base64," in page
    assert "## Judged answers" in (tmp_path / "run" / "report.md").read_text()
    rows = (tmp_path / "run" / "judge.jsonl").read_text().splitlines()
    assert len(rows) == 9
    lines = []
    assert run_gate(tmp_path / "run", **recipe.gate.budgets(), echo=lines.append)  # the recipe's gate, judge included
    assert sum("[judge]: Δscore +0.00 >= -0.50" in line for line in lines) == 3

    # a re-run reuses every answer and verdict: the judge is not contacted at all, not even by the preflight
    again = run_recipe(recipe, tmp_path / "run", cache_dir=tmp_path / "fc")
    assert again["judge_run"] == {**again["judge_run"], "requests": 0, "answered": 0}


def test_recipe_judge_section_is_validated(chat_parent_dir, task_dir):
    with pytest.raises(FlipcheckError, match="judge.url"):
        parse_recipe(recipe_text(chat_parent_dir, task_dir, "localhost:8000", "m"))
    bad = recipe_text(chat_parent_dir, task_dir, "http://x/v1", "m").replace("concurrency: 2", "concurency: 2")
    with pytest.raises(FlipcheckError, match="unknown key 'concurency'"):
        parse_recipe(bad)
