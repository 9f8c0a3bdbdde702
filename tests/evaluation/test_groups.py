"""Tasks as the user named them: an lm-eval group is one row, aggregated as lm-eval aggregates it;
acc_norm as the headline where a task reports it; --per-subtask and --metric."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import MC_CONTINUATIONS, MC_LETTERS, _docs, write_task
from flipcheck.compressors.noise import NoiseConfig, apply_noise
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import metrics as M
from flipcheck.evaluation.report import load_report, render_table
from flipcheck.evaluation.samples import SampleRow, summarize_group, summarize_task
from flipcheck.evaluation.tasks import TaskNode, leaf_weights
from flipcheck.gate import check
from flipcheck.models import save_model
from flipcheck.orchestrate.evaluate import evaluate

# lm-eval averages this group's two subtasks alike (weight_by_size: false), so its figures are not
# the pooled ones: tg_small has 6 questions, tg_large 18.
GROUP = """group: tiny_group
task:
  - tg_small
  - tg_large
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: false
"""


@pytest.fixture(scope="module")
def group_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("group_tasks")
    write_task(folder, "tg_small", _docs(6, seed=11), MC_LETTERS)
    write_task(folder, "tg_large", _docs(18, seed=12), MC_LETTERS)
    write_task(folder, "tg_sentences", _docs(16, seed=13), MC_CONTINUATIONS)  # reports acc and acc_norm
    (folder / "tiny_group.yaml").write_text(GROUP)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("group_models")
    save_model(tiny_model, tiny_tokenizer, root / "parent", {"parent": None})
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=1.0, seed=3), None)
    save_model(child, tiny_tokenizer, root / "child", {"parent": str(root / "parent")})
    return root


@pytest.fixture(scope="module")
def grouped(pair, group_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("group_run")
    report = evaluate(
        str(pair / "parent"), str(pair / "child"), tasks="tiny_group,tg_sentences", include_path=str(group_dir),
        out=out / "run", cache_dir=out / "cache", batch_size=8,
    )
    return report, out


def test_group_is_one_row_weighted_as_lm_eval_weights_it(grouped, group_dir, tiny_model, tiny_tokenizer):
    report, out = grouped
    child = report["children"][0]
    assert list(child["tasks"]) == ["tiny_group", "tg_sentences"]  # as named: no leaf of the group is a row
    g = child["tasks"]["tiny_group"]
    subs = g["subtasks"]
    assert sorted(subs) == ["tg_large", "tg_small"] and g["n"] == 24
    # unweighted mean of the two subtasks, as lm-eval's own group figure for the parent
    for key in ("acc_P", "acc_C", "delta_acc", "flips"):
        assert g[key] == pytest.approx((subs["tg_small"][key] + subs["tg_large"][key]) / 2), key
    assert subs["tg_small"]["flips"] != subs["tg_large"]["flips"]  # so the weighting shows
    assert g["aggregation"] == "weighted mean of subtasks" and g["weights"] == {"tg_large": 0.5, "tg_small": 0.5}
    assert g["kl_options"]["n"] == 24  # KL pooled over the group's questions
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=tiny_model, tokenizer=tiny_tokenizer, batch_size=8), tasks=["tiny_group"],
        task_manager=TaskManager(include_path=str(group_dir), include_defaults=False), bootstrap_iters=0,
        verbosity="ERROR",
    )
    assert g["acc_P"] == pytest.approx(res["results"]["tiny_group"]["acc,none"], abs=1e-9)
    assert child["macro"]["tasks"] == 2  # the macro is over the named rows: the group counts once
    assert child["macro"]["flips"] == pytest.approx((g["flips"] + child["tasks"]["tg_sentences"]["flips"]) / 2)


def test_gate_and_terminal_judge_the_group_as_named(grouped):
    report, out = grouped
    verdicts = check(report, max_flips="100%")
    assert [v.task for v in verdicts] == ["tiny_group", "tg_sentences", "all tasks (micro)"]
    assert verdicts[0].text.startswith("PASS tiny_group [acc]:")
    assert verdicts[1].metric == "acc_norm" and "[acc_norm]" in verdicts[1].text
    md = (out / "run" / "report.md").read_text()
    assert "<details><summary>child / tiny_group: 2 subtasks" in md and "| tg_small (acc) | 6 |" in md
    html = (out / "run" / "report.html").read_text()
    assert "<details><summary>child / tiny_group" in html
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_table(load_report(out / "run")))
    text = console.export_text()
    assert "tiny_group (acc)" in text and "tg_small" not in text and "tg_sentences (acc_norm)" in text


def test_acc_norm_is_the_default_headline_and_metric_acc_switches(grouped, pair, group_dir):
    report, out = grouped
    s = report["children"][0]["tasks"]["tg_sentences"]
    assert s["metric"] == "acc_norm" and set(s["by_metric"]) == {"acc", "acc_norm"}
    for key in ("acc_P", "acc_C", "flips", "delta_acc_ci", "mcnemar_p", "margin"):
        assert s[key] == s["by_metric"]["acc_norm"][key], key
    # the same run (cache) with --metric acc and --per-subtask: every leaf is a row, acc the headline
    again = evaluate(
        str(pair / "parent"), str(pair / "child"), tasks="tiny_group,tg_sentences", include_path=str(group_dir),
        cache_dir=out / "cache", batch_size=8, metric="acc", per_subtask=True,
    )
    tasks = again["children"][0]["tasks"]
    assert sorted(tasks) == ["tg_large", "tg_sentences", "tg_small"]
    assert tasks["tg_sentences"]["metric"] == "acc"
    assert tasks["tg_sentences"]["flips"] == s["by_metric"]["acc"]["flips"]
    judged = {v.task for v in check(again, max_flips="100%")}
    assert judged == {"tg_large", "tg_sentences", "tg_small", "all tasks (micro)"}
    with pytest.raises(FlipcheckError, match="--metric 'accuracy': choose one of acc, acc_norm"):
        evaluate(str(pair / "parent"), str(pair / "child"), tasks="tg_sentences", include_path=str(group_dir),
                 metric="accuracy")


def _rows(task: str, cp: list[int], cc: list[int]) -> list[SampleRow]:
    return [SampleRow(task=task, doc_id=i, gold=0, pred_P=0 if p else 1, pred_C=0 if c else 1, correct_P=bool(p),
                      correct_C=bool(c), kl_options=0.0, kl_vocab=None, top1_agree=None, margin_P=0.5)
            for i, (p, c) in enumerate(zip(cp, cc, strict=True))]


def test_group_weights_by_hand():
    small = _rows("s", [1, 1, 0, 0], [1, 0, 0, 0])  # flips 1/4
    large = _rows("l", [1] * 12, [1] * 11 + [0])  # flips 1/12
    tree = TaskNode("g", "group", [TaskNode("s", "task"), TaskNode("l", "task")], weight_by_size=False)
    w = leaf_weights(tree, {"s": 4, "l": 12})
    assert w == {"s": 0.5, "l": 0.5}
    leaf = {"s": summarize_task(small, n_boot=200), "l": summarize_task(large, n_boot=200)}
    g = summarize_group("g", {"s": small, "l": large}, leaf, w, n_boot=400)
    assert g["flips"] == pytest.approx((1 / 4 + 1 / 12) / 2)
    assert g["delta_acc"] == pytest.approx((-1 / 4 - 1 / 12) / 2)
    lo, hi = g["delta_acc_ci"]
    assert lo <= g["delta_acc"] <= hi and hi <= 0.0
    assert g["mcnemar_p"] == M.mcnemar_exact(2, 0)
    # weighted by size (lm-eval's default), the group is the micro over its questions
    tree.weight_by_size = True
    sized = summarize_group("g", {"s": small, "l": large}, leaf, leaf_weights(tree, {"s": 4, "l": 12}), n_boot=400)
    pooled = summarize_task(small + large, n_boot=400, task="g")
    assert sized["flips"] == pytest.approx(2 / 16) and sized["aggregation"] == "size-weighted"
    assert sized["delta_acc_ci"] == pooled["delta_acc_ci"]
    # nested: an unweighted top over a size-weighted subgroup and a leaf
    nested = TaskNode("top", "group", [TaskNode("sub", "group", [TaskNode("a", "task"), TaskNode("b", "task")],
                                                weight_by_size=True), TaskNode("c", "task")], weight_by_size=False)
    assert leaf_weights(nested, {"a": 1, "b": 3, "c": 10}) == {"a": 0.125, "b": 0.375, "c": 0.5}
    assert leaf_weights(nested, {"a": 1, "zzz": 2}) is None  # a task outside the tree: the caller pools


def test_stratified_interval_matches_a_single_stratum():
    rng = np.random.default_rng(0)
    cp, cc = rng.random(50) < 0.6, rng.random(50) < 0.5
    assert M.stratified_bootstrap_delta_ci([(cp, cc)], [1.0], n_boot=300, seed=4) == M.bootstrap_delta_ci(
        cp, cc, n_boot=300, seed=4)


def test_recipe_evaluation_keys():
    from flipcheck.recipes.schema import EvaluationSpec

    spec = EvaluationSpec(tasks=["mmlu"], per_subtask=True, metric="acc", filter="strict-match")
    assert (spec.per_subtask, spec.metric, spec.filter) == (True, "acc", "strict-match")
    assert EvaluationSpec().per_subtask is False and EvaluationSpec().metric is None
    with pytest.raises(ValueError, match="acc_norm"):
        EvaluationSpec(metric="accuracy")


def test_cli_bad_metric_and_filter_are_one_line_exit_2(pair, group_dir):
    from typer.testing import CliRunner

    from flipcheck.cli import app

    res = CliRunner().invoke(app, ["eval", "no/such/parent", "no/such/child", "--metric", "acc-norm"])
    assert res.exit_code == 2 and "--metric 'acc-norm': choose one of acc, acc_norm" in res.output
    res = CliRunner().invoke(app, ["eval", str(pair / "parent"), str(pair / "child"), "--tasks", "tiny_group",
                                   "--include-path", str(group_dir), "--filter", "strict-match", "--no-cache"])
    assert res.exit_code == 2 and "--filter 'strict-match'" in res.output and "tg_small: none" in res.output
