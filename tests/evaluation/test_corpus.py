"""Distance on text: corpus windows, KL both ways against numpy, caching, the noise floor, the gate."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.compressors.noise import NoiseConfig, apply_noise
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.cache import ResultCache
from flipcheck.evaluation.corpus import scored_range, windows
from flipcheck.evaluation.model_ref import child_ref
from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef
from flipcheck.gate import run_gate
from flipcheck.models import load_model, save_model
from flipcheck.orchestrate.evaluate import evaluate
from flipcheck.tiny import write_lm_eval_task

CTX = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, tiny_tokenizer):
    from conftest import corpus

    root = tmp_path_factory.mktemp("corpus")
    save_model(tiny_model, tiny_tokenizer, root / "parent", {"parent": None})
    m = copy.deepcopy(tiny_model)
    apply_noise(m, NoiseConfig(sigma=0.3, seed=1), None)
    save_model(m, tiny_tokenizer, root / "child", {"parent": str(root / "parent")})
    save_model(copy.deepcopy(tiny_model), tiny_tokenizer, root / "twin", {"parent": str(root / "parent")})
    lines = corpus()
    write_lm_eval_task(root / "ppl", "tiny_ppl", [{"text": t} for t in lines[:40]],
                       'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n')
    (root / "text.txt").write_text("\n".join(lines[40:100]))
    return root


def _numpy_figures(root, corpus_texts, scoring, tokenizer):
    """An independent computation: plain forwards, float64 numpy log-softmax, every figure by hand."""
    from flipcheck.evaluation.corpus import Corpus

    p, c = (load_model(str(root / n), device="cpu", dtype="float32") for n in ("parent", "child"))
    wins = windows(tokenizer, Corpus("x", "x", tuple(corpus_texts)), CTX)
    acc = {k: [] for k in ("kl", "kl_rev", "agree", "dp", "nll_p", "nll_c")}
    for w in wins:
        ids = torch.from_numpy(w)[None]
        with torch.no_grad():
            lp = p(input_ids=ids).logits[0].double().numpy()
            lc = c(input_ids=ids).logits[0].double().numpy()
        s, e = scored_range(len(w), scoring)
        lp, lc = lp[s:e], lc[s:e]
        lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
        lc = lc - np.log(np.exp(lc - lc.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lc.max(-1, keepdims=True)
        t = w[s + 1 : e + 1]
        acc["kl"].append((np.exp(lp) * (lp - lc)).sum(-1))
        acc["kl_rev"].append((np.exp(lc) * (lc - lp)).sum(-1))
        acc["agree"].append(lp.argmax(-1) == lc.argmax(-1))
        rows = np.arange(len(t))
        acc["dp"].append(np.exp(lc[rows, t]) - np.exp(lp[rows, t]))
        acc["nll_p"].append(-lp[rows, t])
        acc["nll_c"].append(-lc[rows, t])
    a = {k: np.concatenate(v) for k, v in acc.items()}
    return {
        "tokens": len(a["kl"]), "kl": a["kl"].mean(), "kl_p99": np.quantile(a["kl"], 0.99), "kl_max": a["kl"].max(),
        "kl_rev": a["kl_rev"].mean(), "agree": a["agree"].mean(), "dp_rms": np.sqrt((a["dp"] ** 2).mean()),
        "ppl_p": np.exp(a["nll_p"].mean()), "ppl_c": np.exp(a["nll_c"].mean()),
    }


@pytest.mark.parametrize("scoring", ["all", "half"])
def test_corpus_figures_match_an_independent_numpy_computation(setup, tiny_tokenizer, tmp_path, scoring):
    from conftest import corpus

    report = evaluate(str(setup / "parent"), [str(setup / "child")], tasks=[], texts=[str(setup / "text.txt")],
                      ctx=CTX, scoring=scoring, kl="exact", cache_dir=tmp_path / "cache", out=tmp_path / "run")
    fig = report["children"][0]["corpus"]["text.txt"]
    ref = _numpy_figures(setup, ["\n".join(corpus()[40:100])], scoring, tiny_tokenizer)
    assert fig["tokens"] == ref["tokens"]
    assert fig["kl"]["mean"] == pytest.approx(ref["kl"], rel=1e-4)
    assert fig["kl"]["max"] == pytest.approx(ref["kl_max"], rel=1e-3)
    assert fig["kl_rev"]["mean"] == pytest.approx(ref["kl_rev"], rel=1e-4)
    assert fig["top1_agree"]["mean"] == pytest.approx(ref["agree"])
    assert fig["dp_rms"] == pytest.approx(ref["dp_rms"], rel=1e-4)
    assert fig["ppl_parent"] == pytest.approx(ref["ppl_p"], rel=1e-5)
    assert fig["ppl_child"] == pytest.approx(ref["ppl_c"], rel=1e-5)
    assert fig["ln_ppl_ratio"]["mean"] == pytest.approx(np.log(ref["ppl_c"] / ref["ppl_p"]), rel=1e-4)
    lo, hi = fig["kl"]["ci"]
    assert lo <= fig["kl"]["mean"] <= hi
    assert sum(fig["kl_hist"]["counts"]) == fig["tokens"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Distance on text" in page and "KL(P‖C) per token, text.txt" in page
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Distance on text" in md
    # text alone: no questions, so no per-task table and no flipped questions
    assert "## Per task" not in md and "Flipped questions" not in md
    assert "<h2>Per task</h2>" not in page and "Flipped questions" not in page


def test_windows_follow_llama_cpp_chunks(tiny_tokenizer):
    from flipcheck.evaluation.corpus import Corpus, adds_bos

    text = "the cat sat on the mat " * 40
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    wins = windows(tiny_tokenizer, Corpus("x", "x", (text,)), 16)
    assert not adds_bos(tiny_tokenizer)  # no BOS: windows are plain consecutive chunks
    assert len(wins) == len(ids) // 16 and all(list(w) == ids[16 * i : 16 * i + 16] for i, w in enumerate(wins))
    assert scored_range(16, "all") == (0, 15)  # logits 0..14 predict tokens 1..15
    assert scored_range(16, "half") == (8, 15)  # tokens 9..15, as llama-perplexity scores a chunk

    class WithBos:  # a tokenizer that adds BOS: each window's first token becomes BOS
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            enc = tiny_tokenizer(text, add_special_tokens=False)
            if add_special_tokens:
                enc["input_ids"] = [1, *enc["input_ids"]] if isinstance(text, str) else [[1, *e] for e in enc["input_ids"]]
            return enc

    bos_wins = windows(WithBos(), Corpus("x", "x", (text,)), 16)
    assert all(w[0] == 1 and list(w[1:]) == ids[16 * i + 1 : 16 * i + 16] for i, w in enumerate(bos_wins))


def test_perplexity_task_is_a_corpus_and_the_cached_parent_serves_every_child(setup, tmp_path):
    settings = EvalSettings(tasks=["tiny_ppl"], include_path=str(setup / "ppl"), ctx=CTX, n_boot=100, topk=64)
    ev = Evaluator(ModelRef("parent", str(setup / "parent")), settings, ResultCache(tmp_path / "cache"))
    assert ev.units == [] and list(ev.corpora) == ["tiny_ppl"]
    twin, _ = ev.evaluate_child(child_ref(str(setup / "twin")))
    noisy, _ = ev.evaluate_child(child_ref(str(setup / "child")))
    assert ev.parent_passes == 1  # the parent's side scored once for both children
    t, n = twin["corpus"]["tiny_ppl"], noisy["corpus"]["tiny_ppl"]
    assert t["kl"]["max"] < 1e-5 and t["kl_rev"]["max"] < 1e-5 and t["top1_agree"]["mean"] == 1.0
    assert t["dp_rms"] < 1e-6 and t["ppl_child"] == pytest.approx(t["ppl_parent"], rel=1e-5)
    # against the cache the KL is an estimate; lock-step gives the exact value it must be close to
    exact = Evaluator(ModelRef("parent", str(setup / "parent")), EvalSettings(
        tasks=["tiny_ppl"], include_path=str(setup / "ppl"), ctx=CTX, n_boot=100, kl="exact"), ResultCache(tmp_path / "c2"))
    e, _ = exact.evaluate_child(child_ref(str(setup / "child")))
    ex = e["corpus"]["tiny_ppl"]
    assert n["kl"]["mean"] == pytest.approx(ex["kl"]["mean"], rel=0.05)
    assert n["kl_rev"]["mean"] == pytest.approx(ex["kl_rev"]["mean"], rel=0.05)
    assert n["ppl_child"] == pytest.approx(ex["ppl_child"], rel=1e-5)  # everything but KL is exact from the cache
    assert n["top1_agree"]["mean"] == pytest.approx(ex["top1_agree"]["mean"])
    # a second evaluator on the same cache (a re-run) loads nothing
    again = Evaluator(ModelRef("parent", str(setup / "parent")), settings, ResultCache(tmp_path / "cache"))
    ref = child_ref(str(setup / "child"))
    entry, _ = again.evaluate_child(ref)
    assert again.parent_passes == 0 and ref.model is None
    assert entry["corpus"]["tiny_ppl"]["kl"]["mean"] == n["kl"]["mean"]


def test_nan_child_fails_the_text_gate(setup, tiny_model, tiny_tokenizer, tmp_path):
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        m.lm_head.weight[3] = float("nan")
    save_model(m, tiny_tokenizer, tmp_path / "nan", {"parent": str(setup / "parent")})
    evaluate(str(setup / "parent"), [str(tmp_path / "nan")], tasks=[], texts=[str(setup / "text.txt")], ctx=CTX,
             cache_dir=tmp_path / "cache", out=tmp_path / "run")
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    fig = data["children"][0]["corpus"]["text.txt"]
    assert fig["nonfinite"]["child"] > 0
    assert not run_gate(tmp_path / "run", max_kl_text=1e9)
    assert not run_gate(tmp_path / "run", max_ppl_ratio="1e9")


def test_gate_on_text_and_over_the_noise_floor(setup, tmp_path):
    out = tmp_path / "run"
    report = evaluate(str(setup / "parent"), [str(setup / "child"), str(setup / "twin")], tasks=[],
                      texts=[str(setup / "text.txt")], ctx=CTX, cache_dir=tmp_path / "cache", out=out, noise_floor=True)
    floor = report["noise_floor"]
    names = [e["name"] for e in floor]
    assert names == ["noise floor: batch size 1", "noise floor: bfloat16-rounded weights", "noise floor: eager attention"]
    rounded = floor[1]["corpus"]["text.txt"]["kl"]["mean"]
    assert rounded > 0  # bf16 rounding of the weights moves the distribution, a little
    noisy = report["children"][0]["corpus"]["text.txt"]
    assert rounded < noisy["kl"]["mean"] / 10
    lines: list[str] = []
    kl = noisy["kl"]["mean"]
    assert not run_gate(out, max_kl_text=kl / 2, echo=lines.append)
    assert any(line.startswith("FAIL") and "text.txt [text]" in line for line in lines)
    ratio = noisy["ppl_child"] / noisy["ppl_parent"]
    assert run_gate(out, max_ppl_ratio=ratio + 1e-3)
    assert not run_gate(out, max_ppl_ratio=ratio - 1e-3)
    # the twin's KL is exactly 0; over the floor, a budget of 0 passes the twin (0 − floor <= 0)
    lines = []
    run_gate(out, max_kl_text=0, over_floor=True, echo=lines.append)
    twin_line = next(line for line in lines if "twin" in line)
    assert twin_line.startswith("PASS") and "floor" in twin_line


def test_bad_corpus_input_is_one_line_exit_2(setup, tmp_path):
    cli = CliRunner()
    res = cli.invoke(app, ["eval", str(setup / "parent"), str(setup / "child"), "--text", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and "--text" in res.output and "no such file" in res.output
    res = cli.invoke(app, ["eval", str(setup / "parent"), str(setup / "child"), "--text", str(setup / "text.txt"),
                           "--scoring", "thirds"])
    assert res.exit_code == 2 and "allowed are all, half" in res.output
    with pytest.raises(FlipcheckError, match="--max-ppl-ratio"):
        run_gate({"schema": "flipcheck.report", "version": 2, "children": [{"name": "x", "corpus": {"c": {}}}]},
                 max_ppl_ratio="5%")


def test_both_directions_on_questions(setup, task_dir, tmp_path):
    """KL(C‖P) over options and vocabulary sits beside KL(P‖C); against the cache it estimates lock-step."""
    tasks = ["tiny_letters", "tiny_sentences"]
    got = {}
    for kl in ("topk", "exact"):
        report = evaluate(str(setup / "parent"), [str(setup / "child")], tasks=tasks, include_path=str(task_dir),
                          kl=kl, cache_dir=tmp_path / "cache", out=tmp_path / kl, batch_size=8)
        got[kl] = report["children"][0]
    rows = [json.loads(line) for line in (tmp_path / "exact" / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        lp = np.array(r["ll_P"]) - np.logaddexp.reduce(r["ll_P"])
        lc = np.array(r["ll_C"]) - np.logaddexp.reduce(r["ll_C"])
        assert r["kl_options_rev"] == pytest.approx(float((np.exp(lc) * (lc - lp)).sum()), abs=1e-6)
        assert r["kl_options"] == pytest.approx(float((np.exp(lp) * (lp - lc)).sum()), abs=1e-6)
    for task in tasks:
        ex, est = got["exact"]["tasks"][task], got["topk"]["tasks"][task]
        assert ex["kl_vocab_rev"]["mean"] > 0 and ex["kl_options_rev"]["mean"] > 0
        assert est["kl_vocab_rev"]["mean"] == pytest.approx(ex["kl_vocab_rev"]["mean"], rel=0.05)
        assert est["kl_options_rev"]["mean"] == pytest.approx(ex["kl_options_rev"]["mean"], rel=1e-4)
