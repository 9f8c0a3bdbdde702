"""search's confirmation: the split is disjoint, stratified and seeded; a winner that passes the search
split and fails the confirmation is not the answer; each split is scored on its own questions only;
bad input (a share outside (0, 1), a split too small to decide the budget) is one line, exit 2, before
any model loads; `plan` says how many questions each split needs."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.decide.splits import min_questions, search_confidence, split_questions
from flipcheck.errors import FlipcheckError

COUNTS = {"mmlu": {"mmlu_anatomy": 135, "mmlu_astronomy": 152, "mmlu_virology": 166}, "arc_easy": {"arc_easy": 2376}}


def test_split_is_disjoint_complete_stratified_and_seeded():
    a = split_questions(COUNTS, 0.3, seed=7)
    for leaves in COUNTS.values():
        for task, n in leaves.items():
            s, c = set(a.search[task]), set(a.confirm[task])
            assert not s & c and s | c == set(range(n))  # disjoint, and every question in one of them
            assert len(c) == round(0.3 * n)  # each subtask holds its own share: stratified
    assert a.sizes("confirm") == {"mmlu": 40 + 46 + 50, "arc_easy": 713}
    again = split_questions(dict(reversed(list(COUNTS.items()))), 0.3, seed=7)  # task order does not matter
    assert again.confirm == a.confirm and again.search == a.search
    other = split_questions(COUNTS, 0.3, seed=8)
    assert other.confirm["arc_easy"] != a.confirm["arc_easy"]
    # a run restricted to a split numbers its questions 0..k-1 in document order: mapped back
    assert a.original("confirm", "arc_easy", 0) == min(a.confirm["arc_easy"])
    with pytest.raises(FlipcheckError, match="at least 2"):
        split_questions({"t": {"t": 1}}, 0.3, seed=0)


def test_the_split_is_in_every_cache_key(task_dir):
    """The parent's (and every child's) results are keyed by the doc ids a run is restricted to."""
    from flipcheck.evaluation.runner import EvalSettings

    def key(samples):
        return EvalSettings(tasks=["tiny_letters"], include_path=str(task_dir), doc_ids=samples).key_fields()

    assert key({"tiny_letters": [0, 1]}) != key({"tiny_letters": [2, 3]}) != key(None)
    assert key({"tiny_letters": [0, 1]}) == key({"tiny_letters": [0, 1]})


def test_bonferroni_and_the_smallest_split_that_decides():
    assert search_confidence(0.95, 8) == pytest.approx(1 - 0.05 / 8)
    assert search_confidence(None, 8) is None
    n = min_questions({"max_flips": "2%"}, 0.95)
    assert n == math.ceil(math.log(0.05) / math.log(0.98))  # 149: 0 flips in n bounded under 2 %
    from flipcheck.evaluation.confidence import cp_upper

    assert cp_upper(0, n, 0.95) <= 0.02 < cp_upper(0, n - 1, 0.95)
    assert min_questions({"max_flips": "2%"}, None) == 1


@pytest.fixture(scope="module")
def parent4(tmp_path_factory, tiny_tokenizer):
    from flipcheck.models import save_model
    from flipcheck.tiny import build_llama

    out = tmp_path_factory.mktemp("confirm_parent") / "parent"
    save_model(build_llama(len(tiny_tokenizer), seed=0, num_hidden_layers=4), tiny_tokenizer, out, {"parent": None})
    return out


def _search(parent, task_dir, root, *extra):
    args = ["search", str(parent), "--method", "rtn", "--choices", "scheme=W4A16,W8A16", "--include-path", str(task_dir),
            "--out", str(root / "run"), "--cache-dir", str(root / "cache"), "--calibration", "demo",
            "--probe-windows", "2", "--probe-ctx", "32", "--batch-size", "8", "--max-candidates", "4", *extra]
    res = CliRunner().invoke(app, args)
    return res, (json.loads((root / "run" / "report.json").read_text())["search"] if res.exit_code in (0, 1) else None)


def test_a_winner_that_fails_confirmation_is_not_the_answer(parent4, task_dir, tmp_path):
    """Searched on tiny_letters, where a mix (W4A16 ×3, W8A16 ×1) is the smallest child within a 4 % flip
    budget (0 flips of 20); confirmed on tiny_sentences, where it flips 5 %: it is not the winner, the
    next smallest passing candidate (uniform W8A16) is confirmed and wins, and both sides' figures are
    reported for each."""
    res, block = _search(parent4, task_dir, tmp_path, "--tasks", "tiny_letters", "--confirm-tasks", "tiny_sentences",
                         "--max-flips", "4%")
    assert res.exit_code == 0, res.output
    by = {c["name"]: c for c in block["candidates"]}
    planted = by[block["search_winner"]]
    assert planted["passed"] and planted["kind"] != "uniform"  # passes the search tasks
    assert planted["tasks"]["tiny_letters"]["flips"] <= 0.04
    conf = block["confirmation"]
    assert conf["mode"] == "tasks" and conf["confirmed"][0] == planted["name"]
    assert not planted["confirmation"]["passed"] and planted["confirmation"]["tasks"]["tiny_sentences"]["flips"] > 0.04
    assert not planted["winner"] and block["winner"] != planted["name"]
    winner = by[block["winner"]]
    assert winner["winner"] and winner["confirmation"]["passed"] and conf["confirmed"] == [planted["name"], winner["name"]]
    assert winner["confirmation"]["tasks"]["tiny_sentences"]["flips"] <= 0.04
    assert winner["size_bits"] > planted["size_bits"]  # the next smallest that passed the search
    smaller_passing = [c for c in block["candidates"] if c["passed"] and c["size_bits"] < winner["size_bits"]]
    assert [c["name"] for c in smaller_passing] == [planted["name"]]
    assert "confirm" in res.output and planted["name"] in (tmp_path / "run" / "report.md").read_text()


def test_the_split_scores_each_side_on_its_own_questions(parent4, task_dir, tmp_path):
    """Default --confirm 0.3: 14 of each task's 20 questions searched, 6 confirmed, the ids as
    split_questions gives them; the progress view hears every step (compress, tasks, sensitivities,
    the confirmation)."""
    from flipcheck.decide.search import search

    steps: list[str] = []
    block = search(str(parent4), "rtn", "scheme=W4A16,W8A16", out=tmp_path / "run", budgets={"max_flips": "50%"},
                   tasks=["tiny_letters", "tiny_sentences"], include_path=str(task_dir), cache_dir=tmp_path / "cache",
                   calibration={"source": "demo"}, probe_windows=2, probe_ctx=32, batch_size=8, max_candidates=4,
                   on_step=steps.append)
    assert steps[:3] == ["uniform-W4A16: compress", "uniform-W4A16: tasks", "uniform-W8A16: compress"]
    assert "W4A16: sensitivities" in steps and steps[-1] == f"{block['winner']}: tasks"  # the confirmation's
    split = block["confirmation"]["split"]
    expected = split_questions({"tiny_letters": {"tiny_letters": 20}, "tiny_sentences": {"tiny_sentences": 20}}, 0.3, 1234)
    assert split["confirm"] == expected.confirm and split["search"] == expected.search
    for c in block["candidates"]:
        assert {t: f["n"] for t, f in c["tasks"].items()} == {"tiny_letters": 14, "tiny_sentences": 14}
    winner = next(c for c in block["candidates"] if c["winner"])
    assert {t: f["n"] for t, f in winner["confirmation"]["tasks"].items()} == {"tiny_letters": 6, "tiny_sentences": 6}
    # the winner on the confirmation questions equals `evaluate` restricted to those doc ids by hand
    from flipcheck.orchestrate.evaluate import evaluate

    report = evaluate(str(parent4), [winner["folder"]], tasks=["tiny_letters", "tiny_sentences"], include_path=str(task_dir),
                      batch_size=8, use_cache=False, doc_ids=expected.confirm)
    for t, f in winner["confirmation"]["tasks"].items():
        e = report["children"][0]["tasks"][t]
        assert (f["n"], f["n_c2i"], f["n_i2c"]) == (e["n"], e["n_c2i"], e["n_i2c"])
    assert block["recipe"]["evaluation"].get("doc_ids") is None  # recipe.yaml judges all the questions


def _prompts(task_dir, task):
    """The task's prompts in doc-id order (the prompts: source of one task reads them so)."""
    from flipcheck.compressors.calibration_data import prompts_source, read_texts

    texts = read_texts(prompts_source([task], task_dir))
    assert len(texts) == 20
    return texts


def test_the_default_probe_text_reads_the_search_split_only(tiny_model_dir, task_dir, tmp_path):
    """Without --calibration a split search probes and calibrates on its search split's prompts: no
    confirmation question's prompt is in the text, every search question's is (--no-confirm reading
    them all: test_offline_text); the file is named by its content, so another split is another key."""
    from flipcheck.compressors.calibration_data import read_texts
    from flipcheck.decide.search import search
    from flipcheck.decide.splits import search_split_text

    tasks = ["tiny_letters", "tiny_sentences"]
    block = search(str(tiny_model_dir), "rtn", "scheme=W4A16,W8A16", out=tmp_path / "run", budgets={"max_flips": "50%"},
                   tasks=tasks, include_path=str(task_dir), cache_dir=tmp_path / "cache", probe_windows=2, probe_ctx=32,
                   batch_size=8, max_candidates=2, device="cpu")
    source, split = block["probe"]["text"], block["confirmation"]["split"]
    assert "search split only" in block["probe"]["note"] and block["recipe"]["calibration"]["source"] == source
    probe, searched = Counter(read_texts(source)), Counter()
    for t in tasks:
        prompts = _prompts(task_dir, t)
        searched.update(prompts[i] for i in split["search"][t])
        confirm_only = {prompts[i] for i in split["confirm"][t]} - {prompts[i] for i in split["search"][t]}
        assert confirm_only and not confirm_only & set(probe)  # (a prompt two questions share may be in both)
    assert probe == searched  # every search question's prompt, once, and nothing else
    assert "search split only" in (tmp_path / "run" / "report.md").read_text()
    cal = {"source": f"prompts:{','.join(tasks)}:{task_dir.resolve()}"}
    counts = {t: {t: 20} for t in tasks}
    again, _ = search_split_text(cal, "note", split_questions(counts, 0.3, 1234), str(task_dir), tmp_path / "run")
    other, _ = search_split_text(cal, "note", split_questions(counts, 0.3, 99), str(task_dir), tmp_path / "run")
    assert again["source"] == source != other["source"]  # the same split resumes; another is another text
    given = {"source": "demo"}  # a text the user chose is left as it is
    assert search_split_text(given, None, split_questions(counts, 0.3, 1), str(task_dir), tmp_path) == (given, None)


@pytest.mark.parametrize(("extra", "needle"), [
    (["--confirm", "1.5"], "--confirm '1.5': the share of the questions held out for confirmation, strictly between 0 and 1"),
    (["--confirm", "0"], "strictly between 0 and 1"),
    (["--confirm", "x"], "strictly between 0 and 1"),
    (["--confidence", "0.95"], "the confirmation split holds 6 question(s) of tiny_letters; deciding the budgets at confidence 0.95 needs at least 149"),
    (["--confirm-tasks", "tiny_sentences", "--confidence", "0.95"], "needs at least 149 per task"),
])
def test_bad_confirmation_input_is_one_line_and_exit_2_before_any_model(task_dir, tmp_path, extra, needle):
    res = CliRunner().invoke(app, ["search", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--method", "rtn",
                                   "--choices", "scheme=W4A16,W8A16", "--max-flips", "2%", "--tasks", "tiny_letters",
                                   "--include-path", str(task_dir), *extra])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert needle in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()  # the parent does not even exist: nothing was loaded


def test_plan_says_how_many_questions_each_split_needs():
    res = CliRunner().invoke(app, ["plan", "--max-flips", "10%", "--expected", "2%", "--confidence", "0.95",
                                   "--confirm", "0.3", "--candidates", "8"])
    assert res.exit_code == 0, res.output
    from flipcheck.evaluation.confidence import plan_questions

    conf = plan_questions(0.10, 0.02, 0.95).questions
    search = plan_questions(0.10, 0.02, 1 - 0.05 / 8).questions
    out = " ".join(res.output.split())
    assert f"search split: {search} questions" in out and f"confirmation split: {conf} questions" in out
    assert f"{max(math.ceil(search / 0.7), math.ceil(conf / 0.3))} questions per task in all" in out
    bad = CliRunner().invoke(app, ["plan", "--max-flips", "10%", "--expected", "2%", "--confirm", "1"])
    assert bad.exit_code == 2 and "strictly between 0 and 1" in bad.output
