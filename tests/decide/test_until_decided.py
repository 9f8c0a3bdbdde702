"""`flipcheck eval --until-decided` on the tiny model and tasks: it stops early on a clearly passing and a
clearly failing child, runs to the end on a borderline one, its counts are those of a plain eval on
the same questions, and bad input is one line, exit 2, before any model loads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flipcheck.cli import app

TASKS = "tiny_letters,tiny_sentences"


@pytest.fixture(scope="module")
def children(tiny_model_dir, tmp_path_factory):
    from flipcheck.compressors.pipeline import compress

    root = tmp_path_factory.mktemp("until")
    out = {}
    for name, sigma in (("same", 0.0), ("wrecked", 3.0), ("noisy", 1.0)):
        out[name] = compress(str(tiny_model_dir), [("noise", {"sigma": sigma})], out=root / name).out
    return root, out


def _run(parent, child, task_dir, out, cache, budget, *extra):
    res = CliRunner().invoke(app, ["eval", str(parent), str(child), "--tasks", TASKS, "--include-path", str(task_dir),
                                   "--until-decided", "--max-flips", budget, "--confidence", "0.95", "--batch-questions", "4",
                                   "--batch-size", "8", "--out", str(out), "--cache-dir", str(cache), *extra])
    block = json.loads((out / "report.json").read_text())["until_decided"] if (out / "report.json").exists() else None
    return res, block


def test_a_clearly_passing_child_stops_early(tiny_model_dir, task_dir, children, tmp_path):
    root, kids = children
    res, block = _run(tiny_model_dir, kids["same"], task_dir, tmp_path / "run", root / "cache", "50%")
    assert res.exit_code == 0, res.output
    assert block["verdict"] == "pass"
    for t in block["tasks"].values():
        assert t["flips"] == 0 and t["decided"] and not t["ran_out"]
        assert t["n_used"] < t["n_total"] == 20 and t["upper"] <= 0.5
    assert "PASS" in res.output


def test_a_clearly_failing_child_stops_early(tiny_model_dir, task_dir, children, tmp_path):
    root, kids = children
    res, block = _run(tiny_model_dir, kids["wrecked"], task_dir, tmp_path / "run", root / "cache", "2%")
    assert res.exit_code == 1, res.output
    assert block["verdict"] == "fail" and block["questions_used"] < block["questions_total"]
    failed = [t for t in block["tasks"].values() if t["verdict"] == "fail"]
    assert failed and all(t["lower"] > 0.02 and t["decided"] for t in failed)


def test_a_borderline_child_runs_to_the_end_and_counts_as_a_plain_eval(tiny_model_dir, task_dir, children, tmp_path):
    """The budget is the child's own flip rate on all 40 questions: no sequence can put the rate on
    either side of it, so every question is scored, and the flips equal `flipcheck eval`'s."""
    from flipcheck.orchestrate.evaluate import evaluate

    root, kids = children
    plain = evaluate(str(tiny_model_dir), [str(kids["noisy"])], tasks=TASKS.split(","), include_path=str(task_dir),
                     batch_size=8, cache_dir=root / "cache")
    flips = {t: s["n_c2i"] + s["n_i2c"] for t, s in plain["children"][0]["tasks"].items()}
    assert sum(flips.values()) > 0
    rate = max(flips.values()) / 20
    res, block = _run(tiny_model_dir, kids["noisy"], task_dir, tmp_path / "run", root / "cache", f"{rate:.4f}")
    assert res.exit_code in (0, 1), res.output
    assert block["questions_used"] == block["questions_total"] == 40 and block["rounds"] == 5
    for task, t in block["tasks"].items():
        assert t["ran_out"] and not t["decided"] and t["flips"] == flips[task]
        assert t["lower"] <= rate <= t["upper"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--until-decided", "--confidence", "0.95"], "--until-decided decides a flip budget: give --max-flips"),
    (["--until-decided", "--max-flips", "2%"], "give --max-flips (e.g. 2%) and --confidence"),
    (["--until-decided", "--max-flips", "150%", "--confidence", "0.95"], "a flip rate between 0 and 1"),
    (["--until-decided", "--max-flips", "2%", "--confidence", "2"], "a confidence level in [0.5, 1)"),
    (["--until-decided", "--max-flips", "2%", "--confidence", "0.95", "--batch-questions", "0"], "--batch-questions 0: must be >= 1"),
    (["--until-decided", "--max-flips", "2%", "--confidence", "0.95", "--noise-floor"], "drop --text, --noise-floor"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, extra, needle):
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "nowhere"), str(tmp_path / "child"), *extra])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in " ".join(res.output.split()), res.output
