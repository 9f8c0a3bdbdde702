"""search and localize offline: every text source is checked before any model loads (one line, exit 2),
and with no text given they read the prompts of the evaluated tasks, which need no network, and say so."""

from __future__ import annotations

import json

import pytest
import transformers
from typer.testing import CliRunner

from flipcheck.cli import app

UNREACHABLE = "hf:wikitext:wikitext-2-raw-v1:train"  # the old default: the hub, unreachable offline


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args[:2])
        raise AssertionError(f"a model was loaded: {args[:2]}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    return loads


def _search(parent, task_dir, out, cache, *extra):
    return ["search", str(parent), "--method", "rtn", "--choices", "scheme=W4A16,W8A16", "--max-flips", "10%",
            "--tasks", "tiny_letters", "--include-path", str(task_dir), "--out", str(out), "--cache-dir", str(cache),
            "--probe-windows", "2", "--probe-ctx", "32", "--batch-size", "8", "--max-candidates", "2", "--device", "cpu",
            *extra]


def test_an_unreachable_source_stops_search_and_localize_before_any_model(tiny_model_dir, task_dir, tmp_path,
                                                                          no_model_loads):
    runner = CliRunner()
    res = runner.invoke(app, _search(tiny_model_dir, task_dir, tmp_path / "s", tmp_path / "cache",
                                     "--calibration", UNREACHABLE))
    assert res.exit_code == 2, res.output
    assert UNREACHABLE in res.output and "no network" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["localize", str(tiny_model_dir), str(tiny_model_dir), "--text", UNREACHABLE,
                              "--out", str(tmp_path / "l"), "--device", "cpu"])
    assert res.exit_code == 2 and UNREACHABLE in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["localize", str(tiny_model_dir), str(tiny_model_dir), "--tasks", "no_such_task",
                              "--include-path", str(task_dir), "--device", "cpu"])
    assert res.exit_code == 2 and "no_such_task" in res.output
    assert no_model_loads == []
    assert not (tmp_path / "s" / "candidates").exists() and not (tmp_path / "s" / "children").exists()
    assert not any((tmp_path / "cache").rglob("*.json"))  # nothing scored, nothing cached


def test_without_text_search_and_localize_read_the_task_prompts_offline(tiny_model_dir, task_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, _search(tiny_model_dir, task_dir, tmp_path / "s", tmp_path / "cache", "--no-confirm"))
    assert res.exit_code in (0, 1), res.output  # a winner or none: either way the search ran to its end
    block = json.loads((tmp_path / "s" / "report.json").read_text())["search"]
    source = f"prompts:tiny_letters:{task_dir.resolve()}"
    assert block["probe"]["text"] == source and "prompts of the evaluated tasks" in block["probe"]["note"]
    assert "search split only" not in block["probe"]["note"]
    from flipcheck.compressors.calibration_data import read_texts

    rows = [json.loads(x) for x in (task_dir / "tiny_letters.jsonl").read_text().splitlines()]
    assert len(read_texts(source)) == len(rows) == 20  # unsplit: every question's prompt is read
    assert block["recipe"]["calibration"]["source"] == source  # the winner's recipe calibrates on it too
    assert "prompts of the evaluated tasks" in (tmp_path / "s" / "report.md").read_text()

    res = runner.invoke(app, ["localize", str(tiny_model_dir), str(tiny_model_dir), "--tasks", "tiny_letters",
                              "--include-path", str(task_dir), "--windows", "2", "--ctx", "16",
                              "--out", str(tmp_path / "l"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "l" / "report.json").read_text())["localize"]
    assert data["text"] == source and data["kl_total"] == 0.0  # the parent against itself
    assert "prompts of the evaluated tasks" in (tmp_path / "l" / "report.md").read_text()


def test_task_prompts_are_the_questions_without_their_answers(task_dir):
    from flipcheck.compressors.calibration_data import prompts_source, read_texts

    texts = read_texts(prompts_source(["tiny_letters"], task_dir))
    rows = [json.loads(x) for x in (task_dir / "tiny_letters.jsonl").read_text().splitlines()]
    assert len(texts) == len(rows) == 20
    assert all(t.rstrip().endswith("Answer:") for t in texts)  # the prompt stops where the answer would start
