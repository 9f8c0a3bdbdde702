"""Rows and summaries from lm-eval's own per-sample dicts (real HFLM runs of a parent and a noisy child)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.samples import SampleRow, aggregate, attach_vocab, build_rows, summarize_task

TASKS = ["tiny_letters", "tiny_sentences", "tiny_sums"]


def _evaluate(model, tokenizer, task_manager) -> dict[str, list[dict]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=TASKS,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    return res["samples"]


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_tokenizer, task_dir):
    """lm-eval samples of the parent and of a child with Gaussian weight noise (sigma 0.5)."""
    from lm_eval.tasks import TaskManager

    from flipcheck.compressors.noise import NoiseConfig, apply_noise

    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.5, seed=0))
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)  # indexing lm-eval's own tasks costs ~10 s
    return _evaluate(tiny_model, tiny_tokenizer, tm), _evaluate(child, tiny_tokenizer, tm)


def _hand_counts(parent: list[dict], child: list[dict]) -> tuple[int, int, int, int]:
    """(flips, c->i, i->c, answer changes), counted directly from lm-eval's records."""

    def answer(s):
        if isinstance(s["filtered_resps"][0], str):
            return s["filtered_resps"][0]
        return int(np.argmax([r[0] for r in s["filtered_resps"]]))

    def correct(s):
        return (s["acc"] if "acc" in s else s["exact_match"]) == 1

    by_doc = {s["doc_id"]: s for s in child}
    flips = c2i = i2c = changes = 0
    for p in parent:
        c = by_doc[p["doc_id"]]
        flips += correct(p) != correct(c)
        c2i += correct(p) and not correct(c)
        i2c += correct(c) and not correct(p)
        changes += answer(p) != answer(c)
    return flips, c2i, i2c, changes


@pytest.mark.parametrize("task", TASKS)
def test_flips_and_answer_changes_equal_hand_count(runs, task):
    parent, child = runs
    rows = build_rows(task, parent[task], child[task])
    s = summarize_task(rows)
    flips, c2i, i2c, changes = _hand_counts(parent[task], child[task])
    n = len(parent[task])
    assert s["n"] == n == len(rows)
    assert s["flips"] == pytest.approx(flips / n)
    assert s["flips_c2i"] == pytest.approx(c2i / n)
    assert s["flips_i2c"] == pytest.approx(i2c / n)
    assert s["answer_changes"] == pytest.approx(changes / n)
    assert s["acc_P"] == pytest.approx(np.mean([x.get("acc", x.get("exact_match")) for x in parent[task]]))
    assert s["acc_C"] == pytest.approx(np.mean([x.get("acc", x.get("exact_match")) for x in child[task]]))
    json.dumps(s, allow_nan=False)  # JSON-serialisable, no NaN


def test_noise_child_actually_flips_answers(runs):
    """Guards the other tests: the sigma=0.5 child must differ from the parent on the sentence task."""
    parent, child = runs
    s = summarize_task(build_rows("tiny_sentences", parent["tiny_sentences"], child["tiny_sentences"]))
    assert s["flips"] > 0
    assert s["answer_changes"] > s["flips"] or s["answer_changes"] >= s["flips"] > 0
    assert s["kl_options"]["mean"] > 0


def test_rows_reproduce_lm_eval_choices(runs):
    """pred = argmax ll reproduces lm-eval's acc, pred_norm = argmax ll/len(choice) its acc_norm."""
    parent, _ = runs
    for task in ("tiny_letters", "tiny_sentences"):
        docs = {s["doc_id"]: s for s in parent[task]}
        for row in build_rows(task, parent[task], parent[task]):
            sample = docs[row.doc_id]
            assert row.gold == sample["target"]
            assert (row.pred_P == row.gold) == (sample["acc"] == 1.0)
            # option texts are lm-eval's doc_to_choice (continuations without the leading space)
            assert row.choices == (["A", "B", "C", "D"] if task == "tiny_letters" else sample["doc"]["endings"])
            if task == "tiny_sentences":
                assert (row.pred_norm_P == row.gold) == (sample["acc_norm"] == 1.0)
            else:
                assert row.pred_norm_P is None


def test_kl_and_margin_per_row_by_hand(runs):
    parent, child = runs
    task = "tiny_sentences"
    rows = {r.doc_id: r for r in build_rows(task, parent[task], child[task])}
    for p in parent[task]:
        c = next(x for x in child[task] if x["doc_id"] == p["doc_id"])
        lp = [r[0] for r in p["filtered_resps"]]
        lc = [r[0] for r in c["filtered_resps"]]
        zp, zc = math.fsum(math.exp(x) for x in lp), math.fsum(math.exp(x) for x in lc)
        pp, pc = [math.exp(x) / zp for x in lp], [math.exp(x) / zc for x in lc]
        kl = sum(a * math.log(a / b) for a, b in zip(pp, pc, strict=True))
        top = sorted(pp, reverse=True)
        row = rows[p["doc_id"]]
        assert row.kl_options == pytest.approx(kl, rel=1e-9, abs=1e-15)
        assert row.margin_P == pytest.approx(top[0] - top[1], rel=1e-9)


def test_identical_child_gives_zero_flips_and_kl(runs):
    parent, _ = runs
    for task in TASKS:
        s = summarize_task(build_rows(task, parent[task], copy.deepcopy(parent[task])))
        assert s["flips"] == 0 and s["answer_changes"] == 0 and s["delta_acc"] == 0
        assert s["delta_acc_ci"] == [0.0, 0.0]
        assert s["mcnemar_p"] == 1.0
        if s["kind"] == "multiple_choice":
            assert s["kl_options"]["mean"] == 0.0 and s["kl_options"]["max"] == 0.0
        else:
            assert s["identical_output"] == 1.0 and s["kl_options"] is None


def test_generative_rows_compare_outputs(runs):
    parent, child = runs
    rows = build_rows("tiny_sums", parent["tiny_sums"], child["tiny_sums"])
    assert all(r.kind == "generate_until" and r.metric == "exact_match" for r in rows)
    out_p = {s["doc_id"]: s["resps"][0][0] for s in parent["tiny_sums"]}
    out_c = {s["doc_id"]: s["resps"][0][0] for s in child["tiny_sums"]}
    same = np.mean([out_p[d] == out_c[d] for d in out_p])
    assert summarize_task(rows)["identical_output"] == pytest.approx(same)
    assert [r.gold for r in rows] == [str(d["x"] + d["y"]) for d in (s["doc"] for s in parent["tiny_sums"])]


def test_doc_hash_mismatch_is_refused(runs):
    parent, _ = runs
    child = copy.deepcopy(parent["tiny_letters"])
    child[3]["doc_hash"] = "0" * 64
    with pytest.raises(FlipcheckError, match=r"tiny_letters: doc_id 3 .*doc_hash"):
        build_rows("tiny_letters", parent["tiny_letters"], child)


def test_prompt_hash_mismatch_and_different_docs_are_refused(runs):
    parent, _ = runs
    child = copy.deepcopy(parent["tiny_letters"])
    child[0]["prompt_hash"] = "f" * 64
    with pytest.raises(FlipcheckError, match="prompt_hash"):
        build_rows("tiny_letters", parent["tiny_letters"], child)
    fewer = copy.deepcopy(parent["tiny_letters"])[:-1]
    missing = parent["tiny_letters"][-1]["doc_id"]
    with pytest.raises(FlipcheckError, match=rf"different documents .*doc_id {missing} only in the parent"):
        build_rows("tiny_letters", parent["tiny_letters"], fewer)


def test_vocab_kl_is_pooled_over_tokens(runs):
    parent, child = runs
    task = "tiny_letters"
    vocab = {
        0: (np.array([0.1, 0.3]), np.array([1, 0])),
        1: (np.array([0.2, 0.2, 0.2, 1.0]), np.array([1, 1, 1, 1])),
    }
    rows = build_rows(task, parent[task], child[task], vocab=vocab)
    r0, r1 = rows[0], rows[1]
    assert r0.kl_vocab == pytest.approx(0.2) and r0.top1_agree == pytest.approx(0.5) and r0.n_tokens == 2
    assert r1.kl_vocab == pytest.approx(0.4) and r1.top1_agree == 1.0
    assert rows[2].kl_vocab is None
    s = summarize_task(rows)
    # pooled over the 6 tokens (not the mean of the two documents' means)
    assert s["kl_vocab"]["mean"] == pytest.approx(2.0 / 6)
    assert s["kl_vocab"]["median"] == pytest.approx(0.2)
    assert s["kl_vocab"]["tokens"] == 6
    assert s["top1_agree"] == pytest.approx(5 / 6)
    # the token arrays are not serialised; rows read back fall back to a token-weighted mean
    d = rows[0].to_dict()
    assert "_tokens" not in d and json.dumps(d)
    back = summarize_task([SampleRow.from_dict(r.to_dict()) for r in rows])
    assert back["kl_vocab"]["mean"] == pytest.approx(2.0 / 6) and back["kl_vocab"]["median"] is None


def test_aggregate_micro_and_macro(runs):
    parent, child = runs
    rows_by_task = {t: build_rows(t, parent[t], child[t]) for t in TASKS}
    summaries = {t: summarize_task(r) for t, r in rows_by_task.items()}
    agg = aggregate(summaries, rows_by_task)
    counts = [_hand_counts(parent[t], child[t]) for t in TASKS]
    n_total = sum(len(parent[t]) for t in TASKS)
    assert agg["micro"]["n"] == n_total
    assert agg["micro"]["flips"] == pytest.approx(sum(c[0] for c in counts) / n_total)
    assert agg["micro"]["kind"] == "mixed"
    assert agg["macro"]["flips"] == pytest.approx(np.mean([summaries[t]["flips"] for t in TASKS]))
    assert agg["macro"]["kl_options"]["mean"] == pytest.approx(
        np.mean([summaries[t]["kl_options"]["mean"] for t in ("tiny_letters", "tiny_sentences")])
    )
    json.dumps(agg, allow_nan=False)


def _mc_sample(doc_id, lls, acc, target=0, **extra):
    return {
        "doc_id": doc_id,
        "target": target,
        "arguments": [("Q:", f" {chr(65 + j)}") for j in range(len(lls))],
        "resps": [[(ll, False)] for ll in lls],
        "filtered_resps": [(ll, False) for ll in lls],
        "filter": "none",
        "metrics": ["acc"],
        "acc": acc,
        **extra,
    }


def test_synthetic_multiple_choice_by_hand():
    # P: answers 0 (right), 1 (wrong), 0 (right); C: 1 (wrong), 2 (wrong), 0 (right)
    parent = [_mc_sample(0, [-1, -2, -3], 1.0), _mc_sample(1, [-2, -1, -3], 0.0), _mc_sample(2, [-1, -5, -5], 1.0)]
    child = [_mc_sample(0, [-2, -1, -3], 0.0), _mc_sample(1, [-3, -2, -1], 0.0), _mc_sample(2, [-1, -5, -5], 1.0)]
    s = summarize_task(build_rows("t", parent, child), n_boot=200)
    assert s["flips"] == pytest.approx(1 / 3) and s["flips_c2i"] == pytest.approx(1 / 3)
    assert s["answer_changes"] == pytest.approx(2 / 3)
    assert s["kl_options"]["n"] == 3 and s["kl_options"]["max"] > 0
    assert s["margin"]["mean_incorrect"] is not None


def test_single_continuation_and_rolling_tasks():
    def ll_sample(doc_id, greedy):
        return {"doc_id": doc_id, "target": " end", "arguments": [("ctx", " end")], "resps": [[(-2.0, greedy)]],
                "filtered_resps": [(-2.0, greedy)], "metrics": ["perplexity", "acc"], "acc": int(greedy)}

    rows = build_rows("lambada_like", [ll_sample(0, True), ll_sample(1, False)], [ll_sample(0, False), ll_sample(1, False)])
    assert [r.kind for r in rows] == ["loglikelihood"] * 2
    assert summarize_task(rows)["flips"] == pytest.approx(0.5)
    assert rows[0].kl_options is None and rows[0].margin_P is None
    rolling = [{"doc_id": 0, "arguments": [("some text",)], "resps": [[-12.0]], "filtered_resps": [-12.0]}]
    with pytest.raises(FlipcheckError, match="perplexity"):
        build_rows("wikitext", rolling, rolling)


def test_filters_pick_one_and_unknown_filter_is_refused():
    def gen(doc_id, out, em, flt):
        return {"doc_id": doc_id, "target": "4", "arguments": [("2+2=", {"until": ["\n"]})], "resps": [[out]],
                "filtered_resps": [out], "filter": flt, "metrics": ["exact_match"], "exact_match": em}

    parent = [gen(0, "4", 1.0, "strict"), gen(0, "4", 1.0, "flex")]
    child = [gen(0, "5", 0.0, "strict"), gen(0, "4", 1.0, "flex")]
    assert build_rows("g", parent, child)[0].correct_C is False  # first filter: strict
    assert build_rows("g", parent, child, filter_name="flex")[0].correct_C is True
    with pytest.raises(FlipcheckError, match="no filter 'other'"):
        build_rows("g", parent, child, filter_name="other")


def test_attach_vocab_counts_infinite_tokens():
    row = build_rows("t", [_mc_sample(0, [-1, -2], 1.0)], [_mc_sample(0, [-1, -2], 1.0)])[0]
    attach_vocab(row, [0.1, np.inf, 0.3], [1, 0, 1])
    # top-1 agreement leaves out the position KL leaves out (its inf): 2 of 2 finite positions agree
    assert row.kl_vocab == pytest.approx(0.2) and row.n_tokens == 3 and row.top1_agree == pytest.approx(1.0)
    s = summarize_task([row])
    assert s["kl_vocab"]["nonfinite"] == 1 and s["kl_vocab"]["mean"] == pytest.approx(0.2)


def test_mutual_info_requests_are_not_options():
    def sample(lls):
        args = [("Q:", " yes"), ("Q:", " no"), ("", " yes"), ("", " no")]  # lm-eval appends ("", option) pairs
        return {"doc_id": 0, "target": 0, "arguments": args, "filtered_resps": [(x, False) for x in lls],
                "metrics": ["acc", "acc_mutual_info"], "acc": float(np.argmax(lls[:2]) == 0), "acc_mutual_info": 1.0}

    (row,) = build_rows("mi", [sample([-1.0, -2.0, -0.5, -0.1])], [sample([-2.0, -1.0, -0.5, -0.1])])
    assert row.choices == ["yes", "no"] and row.ll_P == [-1.0, -2.0]
    assert row.pred_P == 0 and row.pred_C == 1 and row.flipped


# ---------------------------------------------------------------------------------------------
# task shapes end to end through flipcheck.evaluate: Winogrande-style, digit-string choices, filters

WINO = """output_type: multiple_choice
doc_to_text: label
doc_to_choice: contexts
doc_to_target: rest
metric_list:
  - metric: acc
"""

DIGITS = """output_type: multiple_choice
doc_to_text: "Question: What color is the {{animal}}?\\n1. {{choices[0]}}\\n2. {{choices[1]}}\\n3. {{choices[2]}}\\n4. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["1", "2", "3", "4"]
doc_to_target: answer
metric_list:
  - metric: acc
"""

TWO_FILTERS = """output_type: generate_until
doc_to_text: "{{x}} {{y}} ="
doc_to_target: "{{x + y}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
  - name: raw
    filter:
      - function: take_first
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A parent, a noisy child and three task shapes, evaluated once (cached for further runs)."""
    from conftest import ANIMALS, COLORS, write_task
    from flipcheck.compressors.noise import NoiseConfig, apply_noise
    from flipcheck.models import save_model
    from flipcheck.orchestrate.evaluate import evaluate

    root = tmp_path_factory.mktemp("shapes")
    save_model(tiny_model, tiny_tokenizer, root / "parent", {"parent": None})
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.5, seed=2))
    save_model(child, tiny_tokenizer, root / "child", {"parent": str(root / "parent")})
    wino = [{"label": i % 2, "contexts": [f"The {a} saw a {c}" for c in (COLORS[i % 8], COLORS[(i + 3) % 8])],
             "rest": "ball and ran after it slowly."} for i, a in enumerate(ANIMALS[:10])]
    digits = [{"animal": a, "choices": COLORS[i % 4: i % 4 + 4], "answer": str(1 + (i * 3) % 4)}
              for i, a in enumerate(ANIMALS)]
    sums = [{"x": i % 10, "y": (7 * i) % 10} for i in range(6)]
    tasks = root / "tasks"
    write_task(tasks, "tiny_wino", wino, WINO)
    write_task(tasks, "tiny_digits", digits, DIGITS)
    write_task(tasks, "tiny_filters", sums, TWO_FILTERS)

    def run(**kw):
        return evaluate(str(root / "parent"), str(root / "child"), tasks="tiny_wino,tiny_digits,tiny_filters",
                        include_path=str(tasks), cache_dir=root / "cache", batch_size=8, **kw)

    run(out=root / "run")
    rows = [json.loads(x) for x in (root / "run" / "samples.jsonl").read_text().splitlines()]
    return run, root, rows, {"tiny_wino": wino, "tiny_digits": digits}


def test_gold_agrees_with_the_marks_for_every_task_shape(shapes):
    _, root, rows, docs = shapes
    for task in ("tiny_wino", "tiny_digits"):
        mine = [r for r in rows if r["task"] == task]
        assert len(mine) == 10
        for r in mine:
            assert r["correct_P"] == (r["pred_P"] == r["gold"]), (task, r["doc_id"])
            assert r["correct_C"] == (r["pred_C"] == r["gold"]), (task, r["doc_id"])
    wino = {r["doc_id"]: r for r in rows if r["task"] == "tiny_wino"}
    for i, d in enumerate(docs["tiny_wino"]):
        assert wino[i]["gold"] == d["label"]  # the gold option, not the shared continuation
        assert wino[i]["choices"] == [c.rsplit(" ", 1)[1] for c in d["contexts"]]  # the options: the contexts' ends
        assert wino[i]["question"] == d["contexts"][0].rsplit(" ", 1)[0] + " ___ ball and ran after it slowly."
    digits = {r["doc_id"]: r for r in rows if r["task"] == "tiny_digits"}
    for i, d in enumerate(docs["tiny_digits"]):
        assert digits[i]["gold"] == ["1", "2", "3", "4"].index(d["answer"])  # target "3" is option 2, not index 3
    md = (root / "run" / "report.md").read_text()
    for r in rows:  # every flipped question in the report shows the gold next to a right answer
        if r["task"] != "tiny_filters" and r["correct_P"] != r["correct_C"]:
            right = r["pred_P"] if r["correct_P"] else r["pred_C"]
            assert right == r["gold"]
            assert f"| {r['gold']}: {r['choices'][r['gold']]} |" in md


def test_filter_is_recorded_shown_and_chosen(shapes):
    run, root, _, _ = shapes
    from flipcheck.evaluation.report import load_report, report_markdown

    report = load_report(root / "run")
    s = report["children"][0]["tasks"]["tiny_filters"]
    assert s["filter"] == "first-number"  # lm-eval's first filter, now said
    assert report["children"][0]["tasks"]["tiny_wino"]["filter"] == "none"
    assert "tiny_filters (exact_match, filter first-number)" in (root / "run" / "report.md").read_text()
    raw = run(filter="raw")["children"][0]
    assert raw["tasks"]["tiny_filters"]["filter"] == "raw"
    assert raw["tasks"]["tiny_digits"]["filter"] == "none"  # a task with one filter keeps it
    assert "filter raw" in report_markdown(run(filter="raw"), [])
    with pytest.raises(FlipcheckError, match=r"--filter 'strict-match': .*tiny_filters: first-number, raw"):
        run(filter="strict-match")


def test_digit_string_targets_are_read_the_way_the_marks_say():
    """Options "1".."4": target "3" is the label (option 2); a --log_samples file writes index 3 as "3" too."""

    def sample(target, lls, gold_index):
        args = [("Pick:", f" {c}") for c in "1234"]
        return {"doc_id": 0, "target": target, "arguments": args, "filtered_resps": [(x, False) for x in lls],
                "metrics": ["acc"], "acc": float(int(np.argmax(lls)) == gold_index)}

    right_at_2 = [-3.0, -2.0, -0.5, -4.0]
    (row,) = build_rows("d", [sample("3", right_at_2, 2)], [sample("3", [-0.1, -2.0, -0.5, -4.0], 2)])
    assert row.gold == 2 and row.correct_P and not row.correct_C  # label "3" is option 2
    (row,) = build_rows("d", [sample("3", right_at_2, 3)], [sample("3", [-3.0, -2.0, -4.0, -0.5], 3)])
    assert row.gold == 3 and not row.correct_P and row.correct_C  # a written index: the marks say so
    (row,) = build_rows("d", [sample(3, right_at_2, 3)], [sample(3, right_at_2, 3)])
    assert row.gold == 3  # an int target is an index, as lm-eval reads it
