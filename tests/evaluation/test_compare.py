"""`compare` on real lm-eval --log_samples files written by lm-eval's own CLI entry point."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.compare import compare, read_samples_file, task_from_filename
from flipcheck.evaluation.report import load_report, load_rows
from flipcheck.evaluation.samples import build_rows, set_headline, summarize_task

TASKS = ["tiny_sentences", "tiny_sums"]


def _run_cli(model_dir, task_dir, out, monkeypatch) -> None:
    """`lm_eval --model hf ... --log_samples --output_path out`, in-process (the real entry point)."""
    from lm_eval.__main__ import cli_evaluate

    argv = [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}", "--include_path", str(task_dir),
        "--tasks", ",".join(TASKS), "--batch_size", "8", "--device", "cpu", "--log_samples", "--output_path", str(out),
    ]
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", argv)
        m.chdir(out.parent)  # whatever lm-eval might drop in the working directory stays in tmp
        cli_evaluate()


def _in_memory(model_dir, task_dir) -> dict[str, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir}", tasks=TASKS, batch_size=8, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), verbosity="ERROR",
    )
    return res["samples"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_model_dir, task_dir):
    """CLI sample files and in-memory samples of the parent and of a noisy child (sigma 0.5)."""
    from flipcheck.compressors.noise import NoiseConfig, apply_noise

    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("compare")
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.5, seed=0))
    child_dir = root / "noisy_child"
    child.save_pretrained(child_dir)
    tiny_tokenizer.save_pretrained(child_dir)
    files, memory = {}, {}
    try:
        for role, model_dir in (("parent", tiny_model_dir), ("child", child_dir)):
            out = root / f"{role}_out"
            out.mkdir()
            _run_cli(model_dir, task_dir, out, monkeypatch)
            found = {task_from_filename(f): f for f in out.rglob("samples_*.jsonl")}
            assert set(found) == set(TASKS), found
            files[role] = (out, found)
            memory[role] = _in_memory(model_dir, task_dir)
    finally:
        monkeypatch.undo()
    return files, memory


def test_compare_equals_in_memory_figures(runs, tmp_path):
    files, memory = runs
    for task in TASKS:
        report = compare(files["parent"][1][task], files["child"][1][task], out=tmp_path / task)
        (child,) = report["children"]
        in_memory = build_rows(task, memory["parent"][task], memory["child"][task])
        set_headline(in_memory)  # acc_norm where the task reports it, as compare does
        expected = summarize_task(in_memory)
        assert child["tasks"] == {task: expected}
        assert child["tasks"][task]["kl_vocab"] is None  # lm-eval does not log full distributions
        # the written folder reads back
        assert load_report(tmp_path / task)["children"][0]["tasks"][task] == expected
        rows = load_rows(tmp_path / task)
        assert len(rows) == expected["n"] and all(r["child"] == child["name"] for r in rows)
    # the noisy child really differs on the multiple-choice task
    s = compare(files["parent"][1]["tiny_sentences"], files["child"][1]["tiny_sentences"])["children"][0]["tasks"]
    assert s["tiny_sentences"]["by_metric"]["acc"]["flips"] > 0 and s["tiny_sentences"]["kl_options"]["mean"] > 0


def test_file_form_is_read_like_the_in_memory_form(runs):
    files, memory = runs
    records = read_samples_file(files["parent"][1]["tiny_sentences"])
    assert isinstance(records[0]["arguments"], dict)  # lm-eval rewrote arguments as gen_args_i
    assert isinstance(records[0]["filtered_resps"][0][0], str)  # and responses as strings
    from_file = build_rows("tiny_sentences", records, records)
    from_memory = build_rows("tiny_sentences", memory["parent"]["tiny_sentences"], memory["parent"]["tiny_sentences"])
    assert [r.to_dict() for r in from_file] == [r.to_dict() for r in from_memory]


def test_compare_two_output_folders(runs):
    files, memory = runs
    report = compare(files["parent"][0], files["child"][0])
    (child,) = report["children"]
    assert sorted(child["tasks"]) == sorted(TASKS)
    n = sum(len(memory["parent"][t]) for t in TASKS)
    assert child["micro"]["n"] == n
    flips = sum(child["tasks"][t]["flips"] * child["tasks"][t]["n"] for t in TASKS)
    assert child["micro"]["flips"] == pytest.approx(flips / n)
    only = compare(files["parent"][0], files["child"][0], task="tiny_sums")["children"][0]["tasks"]
    assert list(only) == ["tiny_sums"]


def test_missing_file_is_refused(runs, tmp_path):
    files, _ = runs
    with pytest.raises(FlipcheckError, match="no such file"):
        compare(tmp_path / "nope.jsonl", files["child"][1]["tiny_sums"])


def test_not_a_samples_file_is_refused(runs, tmp_path):
    files, _ = runs
    results = next(files["parent"][0].rglob("results_*.json"))  # lm-eval's aggregate file, not samples
    with pytest.raises(FlipcheckError, match="not an lm-eval samples file"):
        compare(results, files["child"][1]["tiny_sums"], task="tiny_sums")
    other = tmp_path / "samples_x_2024-01-01T00-00-00.000000.jsonl"
    other.write_text(json.dumps({"hello": 1}) + "\n")
    with pytest.raises(FlipcheckError, match="not an lm-eval samples file"):
        compare(other, other)
    empty = tmp_path / "samples_y_2024-01-01T00-00-00.000000.jsonl"
    empty.write_text("")
    with pytest.raises(FlipcheckError, match="empty"):
        compare(empty, empty)


def test_doc_hash_mismatch_is_refused(runs, tmp_path):
    files, _ = runs
    src = files["child"][1]["tiny_sums"]
    lines = src.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["doc_hash"] = "0" * 64
    lines[2] = json.dumps(rec)
    bad = tmp_path / src.name
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(FlipcheckError, match=rf"tiny_sums: doc_id {rec['doc_id']} .*doc_hash"):
        compare(files["parent"][1]["tiny_sums"], bad)


def test_task_name_from_file_name_or_argument(runs, tmp_path):
    files, _ = runs
    assert task_from_filename("samples_arc_easy_2024-05-01T12-00-00.123456.jsonl") == "arc_easy"
    assert task_from_filename("samples_mmlu_high_school_physics_2024-05-01T12-00-00.jsonl") == "mmlu_high_school_physics"
    assert task_from_filename("parent.jsonl") is None
    renamed = tmp_path / "parent.jsonl"
    renamed.write_text(files["parent"][1]["tiny_sums"].read_text())
    with pytest.raises(FlipcheckError, match="pass --task"):
        compare(renamed, files["child"][1]["tiny_sums"])
    report = compare(renamed, files["child"][1]["tiny_sums"], task="tiny_sums")
    assert list(report["children"][0]["tasks"]) == ["tiny_sums"]
    with pytest.raises(FlipcheckError, match="different tasks"):
        compare(files["parent"][1]["tiny_sums"], files["child"][1]["tiny_sentences"])
