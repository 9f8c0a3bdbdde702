"""Divergence over whole generations: the pure figures against hand values, and on the tiny model a
child identical to the parent (never diverges, S(t) = 1) and a child altered so that its argmax
changes at one known step of the parent's generation (diverges exactly there)."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flipcheck.evaluation import generations as G
from flipcheck.evaluation.lm import FlipLM

MAX_NEW = 16
GEN_KWARGS = {"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _instances(n: int = 6):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="generate_until", doc={}, arguments=(f"{i} {(3 * i) % 10} =", dict(GEN_KWARGS)),
                     idx=0, metadata=("sums", i, 1)) for i in range(n)]


def _rows(n: int):
    return [SimpleNamespace(task="sums", doc_id=i, kind="generate_until", generation=None) for i in range(n)]


def _trajectories(parent, child, tok, reqs, *, lockstep: bool = False):
    """Rows with the ``generation`` figures of `child` against `parent` (cached parent records, as the runner does)."""
    p = FlipLM(parent, tok, batch_size=4, progress=False)
    p.generate_until(reqs)
    c = FlipLM(child, tok, batch_size=4, progress=False, reference=parent if lockstep else p.records)
    c.generate_until(reqs)
    rows = _rows(len(reqs))
    G.attach(rows, p.records, c.records)
    return rows, p.records, c.records


# ---------------------------------------------------------------------------------------------------
# pure figures


def test_first_divergence_is_an_index_into_the_parent_generation():
    assert G.first_divergence([5, 6, 7], [5, 6, 7]) is None
    assert G.first_divergence([5, 6, 7], [5, 9, 7]) == 1
    assert G.first_divergence([5, 6, 7], [4]) == 0
    assert G.first_divergence([5, 6, 7], [5, 6]) == 2  # the child stopped early: it differs where it ended
    assert G.first_divergence([5, 6], [5, 6, 2]) == 2
    assert G.first_divergence([], []) is None


def test_survival_curve_median_and_task_figures_by_hand():
    first = [None, 0, 2, 5]
    assert G.survival_curve(first, 6) == [0.75, 0.75, 0.5, 0.5, 0.5, 0.25]
    assert G.survival_at([0.75, 0.5], 128) == 0.5  # past the longest generation every one had ended
    assert G.median_first_divergence(first) == 3.5  # of (0, 2, 5, inf)
    assert G.median_first_divergence([None, None, 4]) is None  # most never diverge
    qs = [G.question_figures([1, 2, 3, 4], [1, 2, 3, 4], tf_miss=[0, 0, 0, 0], finish_p="stop", finish_c="stop"),
          G.question_figures([1, 2, 3, 4], [1, 9, 9, 9, 9, 9, 9, 9], tf_miss=[0, 1, 0, 0], finish_p="stop",
                             finish_c="length")]
    t = G.task_figures(qs)
    assert t["identical"] == 0.5 and t["survival"][:3] == [1.0, 0.5, 0.5] and len(t["survival"]) == 8
    assert t["median_first_divergent_token"] is None  # (1, inf): the upper middle value is inf
    assert t["length_ratio"]["median"] == pytest.approx(1.5) and t["length_ratio"]["p90"] == pytest.approx(1.9)
    assert t["termination_P"] == {"stop": 1.0, "length": 0.0} and t["termination_C"] == {"stop": 0.5, "length": 0.5}
    assert t["tf_mismatch"] == pytest.approx(1 / 8) and t["tf_positions"] == 8
    assert t["survival_at"]["1"] == 1.0 and t["survival_at"]["128"] == 0.5


def test_finish_reason_tells_the_limit_from_a_stop():
    def decode(toks):
        return "".join(chr(96 + t) for t in toks)

    assert G.finish_reason([1, 2], 4, {2}, [], decode) == "stop"  # ended before the limit
    assert G.finish_reason([1, 1, 1, 2], 4, {2}, [], decode) == "stop"  # EOS as the last allowed token
    assert G.finish_reason([1, 1, 3, 4], 4, {2}, ["cd"], decode) == "stop"  # a stop sequence completed last
    assert G.finish_reason([1, 1, 1, 1], 4, {2}, ["cd"], decode) == "length"


# ---------------------------------------------------------------------------------------------------
# the tiny model


def test_identical_child_never_diverges_and_survives_everywhere(tiny_model, tiny_tokenizer):
    reqs = _instances()
    rows, p, c = _trajectories(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, reqs)
    for r in rows:
        g = r.generation
        assert g["first_divergent_token"] is None and g["len_P"] == g["len_C"] > 0
        assert g["tf_mismatch"] == 0.0 and max(g["kl"]) <= 1e-5
        assert g["finish_P"] == g["finish_C"] and g["finish_P"] in G.FINISHES
    t = G.summary(rows)
    assert t["identical"] == 1.0 and set(t["survival"]) == {1.0} and len(t["survival"]) == max(
        r.generation["len_P"] for r in rows)
    assert t["length_ratio"]["median"] == 1.0 and t["median_first_divergent_token"] is None


def _altered_at(model, tok, req, k: int):
    """A copy of `model` whose greedy generation for `req` equals the parent's through token k - 1 and
    differs at token k: the input embedding of the parent's token k - 1 is replaced, and that token
    appears nowhere earlier in the prompt or the generation, so (causal attention) every prediction
    before it is unchanged. The replacement is drawn until the argmax at step k differs."""
    lm = FlipLM(model, tok, batch_size=1, progress=False)
    lm.generate_until([req])
    rec = next(iter(lm.records.values()))
    gen = [int(t) for t in rec.token_ids]
    prompt = lm._encode_context(req.args[0])
    trigger = gen[k - 1]
    assert trigger not in prompt and trigger not in gen[: k - 1], "pick a k whose token is new"
    ids = torch.tensor([prompt + gen[:k]])
    for seed in range(50):
        child = copy.deepcopy(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            emb = child.get_input_embeddings().weight
            emb[trigger] = torch.randn(emb.shape[1], generator=g) * emb.std() * 4
            if int(child(ids).logits[0, -1].argmax()) != gen[k]:
                return child, gen
    raise AssertionError("no replacement changed the argmax at step k")


def _pick_k(model, tok, req) -> int:
    lm = FlipLM(model, tok, batch_size=1, progress=False)
    lm.generate_until([req])
    gen = [int(t) for t in next(iter(lm.records.values())).token_ids]
    prompt = lm._encode_context(req.args[0])
    for k in range(3, len(gen)):
        if gen[k - 1] not in prompt and gen[k - 1] not in gen[: k - 1]:
            return k
    pytest.fail(f"no token of the generation {gen} is new after the prompt {prompt}")


@pytest.mark.parametrize("lockstep", [False, True], ids=["cached parent", "lock-step"])
def test_child_altered_at_a_known_step_diverges_exactly_there(tiny_model, tiny_tokenizer, lockstep):
    reqs = _instances()
    target = 2
    k = _pick_k(tiny_model, tiny_tokenizer, reqs[target])
    child, parent_gen = _altered_at(tiny_model, tiny_tokenizer, reqs[target], k)
    rows, p, c = _trajectories(tiny_model, child, tiny_tokenizer, reqs, lockstep=lockstep)
    g = rows[target].generation
    assert g["first_divergent_token"] == k
    assert [int(t) for t in p[("sums", target, 0)].token_ids] == parent_gen
    # teacher forced along the parent's tokens: the child agrees before k (same predictions), not at k
    miss = np.asarray(c[("sums", target, 0)].tf_miss)
    assert not miss[:k].any() and miss[k]
    kl = np.asarray(g["kl"], dtype=float)
    assert np.all(kl[:k] <= 1e-5) and kl[k] > 1e-3
    t = G.summary(rows)
    assert t["survival"][k - 1] >= t["survival"][k]  # S(k) counts it, S(k + 1) does not
    first = [r.generation["first_divergent_token"] for r in rows]
    assert t["survival"][k] == pytest.approx(np.mean([d is None or d >= k + 1 for d in first]))


# ---------------------------------------------------------------------------------------------------
# through evaluate: report.json, samples rows, report.md / report.html, the noise floor


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, tiny_model, tiny_tokenizer, task_dir):
    """parent, an identical twin and a noisy child on the generative tiny_sums, with the noise floor."""
    from flipcheck.compressors.noise import NoiseConfig, apply_noise
    from flipcheck.models import save_model
    from flipcheck.orchestrate.evaluate import evaluate

    root = tmp_path_factory.mktemp("gen_run")
    save_model(tiny_model, tiny_tokenizer, root / "parent", {"parent": None})
    save_model(copy.deepcopy(tiny_model), tiny_tokenizer, root / "twin", {"parent": str(root / "parent")})
    noisy = copy.deepcopy(tiny_model)
    apply_noise(noisy, NoiseConfig(sigma=0.5, seed=3), None)
    save_model(noisy, tiny_tokenizer, root / "noisy", {"parent": str(root / "parent")})
    report = evaluate(str(root / "parent"), [str(root / "twin"), str(root / "noisy")], tasks=["tiny_sums"],
                      include_path=str(task_dir), out=root / "run", cache_dir=root / "cache", batch_size=4,
                      noise_floor=True)
    return root / "run", report


def test_report_and_samples_carry_the_generation_figures(gen_run):
    import json

    run, report = gen_run
    twin, noisy = (c["tasks"]["tiny_sums"]["generation"] for c in report["children"])
    assert twin["identical"] == 1.0 and set(twin["survival"]) == {1.0} and twin["tf_mismatch"] == 0.0
    assert twin["length_ratio"]["median"] == 1.0 and twin["termination_P"] == twin["termination_C"]
    assert noisy["identical"] < 1.0 and noisy["survival"][-1] < 1.0 and noisy["tf_mismatch"] > 0.0
    assert all(a >= b for a, b in zip(noisy["survival"], noisy["survival"][1:], strict=False))  # S never rises
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["children"][1]["tasks"]["tiny_sums"]["generation"]["survival"] == noisy["survival"]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    by_child = {c: [r for r in rows if r["child"] == c] for c in ("twin", "noisy")}
    assert len(by_child["noisy"]) == 12 and all(r["generation"] for r in rows)
    first = [r["generation"]["first_divergent_token"] for r in by_child["noisy"]]
    assert noisy["survival"] == G.survival_curve(first, len(noisy["survival"]))  # the task block is the rows'
    for r in by_child["noisy"]:
        g = r["generation"]
        if g["first_divergent_token"] is None:
            assert r["output_P"] == r["output_C"]
        assert len(g["kl"]) == len(g["kl_rev"]) == g["tf_positions"] == g["len_P"]
    # the noise floor rows (same weights, other batch size / dtype / attention) get the same figures
    floors = report["noise_floor"]
    assert floors and all(f["tasks"]["tiny_sums"]["generation"]["n"] == 12 for f in floors)


def test_reports_show_the_table_and_the_plots(gen_run):
    run, _ = gen_run
    md = (run / "report.md").read_text()
    assert "## Divergence over generations" in md and "| noisy | tiny_sums | 12 |" in md
    for name in ("generations-survival-tiny_sums.png", "generations-lengths-tiny_sums.png"):
        assert f"]({name})" in md and (run / name).read_bytes()[:4] == b"\x89PNG"
    page = (run / "report.html").read_text()
    assert "Divergence over generations" in page and 'alt="survival S(t), tiny_sums"' in page
    assert 'alt="generation lengths, tiny_sums"' in page
