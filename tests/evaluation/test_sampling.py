"""Seed-synchronised sampling: the Gumbel-max draw has the nucleus distribution, identical models give
identical texts over 4 samples, a changed child diverges, settings are checked and enter the cache key."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation import generations as G
from flipcheck.evaluation.lm import FlipLM
from flipcheck.evaluation.sampling import SampleSpec, draw, parse_sample, split_samples, warp

GEN_KWARGS = {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 12}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _instances(n: int = 5):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="generate_until", doc={}, arguments=(f"{i} {(3 * i) % 10} =", dict(GEN_KWARGS)),
                     idx=0, metadata=("sums", i, 1)) for i in range(n)]


@pytest.mark.parametrize("text, samples, why", [
    ("temperature=0", 1, "temperature=0"), ("top_p=0.9", 1, "temperature is required"),
    ("temperature=0.7,top_p=1.5", 1, "top_p=1.5"), ("temperature=0.7,top_k=-1", 1, "top_k=-1"),
    ("temperature=hot", 1, "not a number"), ("temp=0.7", 1, "cannot read"), ("temperature=0.7", 0, "--samples 0"),
    (None, 4, "sampling needs --sample"), ("temperature=0.7,temperature=0.8", 1, "given twice"),
])
def test_bad_sample_settings_are_one_line(text, samples, why):
    with pytest.raises(FlipcheckError, match=why) as err:
        parse_sample(text, samples)
    assert "\n" not in str(err.value)


def test_parse_sample():
    assert parse_sample(None) is None
    assert parse_sample("temperature=0.7,top_p=0.95", 4, seed=3) == SampleSpec(0.7, 0.95, 0, 4, 3)


def test_gumbel_max_draws_from_the_nucleus_distribution():
    """Frequencies over 4000 positions against softmax(z / T) restricted to the top-p nucleus."""
    spec = SampleSpec(temperature=0.7, top_p=0.9, seed=5)
    z = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    p = torch.softmax(z[0].double() / 0.7, -1).numpy()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    keep[order[: int(np.searchsorted(np.cumsum(p[order]), 0.9) + 1)]] = True
    want = np.where(keep, p, 0) / p[keep].sum()
    counts = np.bincount([int(draw(spec, z, [("t", 0, 0)], 0, t)[0]) for t in range(4000)], minlength=6)
    assert counts[~keep].sum() == 0  # never outside the nucleus
    assert np.abs(counts / 4000 - want).max() < 0.03
    assert torch.isinf(warp(spec, z)[0, ~torch.from_numpy(keep)]).all()


def _sampled(parent, child, tok, spec, reqs):
    p = FlipLM(parent, tok, batch_size=2, progress=False, sampling=spec)
    p.generate_until(reqs)
    c = FlipLM(child, tok, batch_size=3, progress=False, sampling=spec, reference=p.records)  # other batches
    c.generate_until(reqs)
    return p.records, c.records


def test_identical_models_sample_identical_texts_over_four_samples(tiny_model, tiny_tokenizer):
    spec = parse_sample("temperature=0.9,top_p=0.95", 4, seed=11)
    reqs = _instances()
    p, c = _sampled(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, spec, reqs)
    greedy = FlipLM(tiny_model, tiny_tokenizer, batch_size=2, progress=False)
    greedy.generate_until(reqs)
    drawn = set()
    for key, rec in p.items():
        mine = [list(rec.token_ids)] + split_samples(rec)
        theirs = [list(c[key].token_ids)] + split_samples(c[key])
        assert len(mine) == 4 and mine == theirs  # the same four texts, token for token
        drawn.update(tuple(s) for s in mine)
    assert len(drawn) > len(p)  # the four samples of a question are not all the same: it does sample
    assert any(list(greedy.records[k].token_ids) != list(p[k].token_ids) for k in p)  # and not greedily
    rows = [type("R", (), {"task": "sums", "doc_id": i, "kind": "generate_until", "generation": None})()
            for i in range(len(reqs))]
    G.attach(rows, p, c)
    t = G.summary(rows)
    assert t["pairs"] == 4 * len(reqs) and t["identical"] == 1.0 and t["matched"] == 1.0 and set(t["survival"]) == {1.0}


def test_a_changed_child_keeps_the_parent_text_less_often(tiny_model, tiny_tokenizer):
    from flipcheck.compressors.noise import NoiseConfig, apply_noise

    spec = parse_sample("temperature=0.9", 4, seed=11)
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.5, seed=2), None)
    reqs = _instances()
    p, c = _sampled(tiny_model, child, tiny_tokenizer, spec, reqs)
    rows = [type("R", (), {"task": "sums", "doc_id": i, "kind": "generate_until", "generation": None})()
            for i in range(len(reqs))]
    G.attach(rows, p, c)
    t = G.summary(rows)
    assert t["identical"] < 1.0 and t["matched"] < 1.0
    for r in rows:
        for s in r.generation["samples"]:
            assert (s["first_divergent_token"] is None) == (s["matched"] == 1.0)


def test_sampling_settings_reach_the_cache_key_and_the_report(tiny_model, tiny_tokenizer, task_dir, tmp_path):
    from flipcheck.models import save_model
    from flipcheck.orchestrate.evaluate import evaluate

    save_model(tiny_model, tiny_tokenizer, tmp_path / "parent", {"parent": None})
    save_model(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "twin", {"parent": str(tmp_path / "parent")})
    common = dict(tasks=["tiny_sums"], include_path=str(task_dir), cache_dir=tmp_path / "cache", batch_size=4)
    greedy = evaluate(str(tmp_path / "parent"), [str(tmp_path / "twin")], out=tmp_path / "g", **common)
    sampled = evaluate(str(tmp_path / "parent"), [str(tmp_path / "twin")], out=tmp_path / "s",
                       sample="temperature=1.5", samples=2, **common)
    g = sampled["children"][0]["tasks"]["tiny_sums"]["generation"]
    assert g["pairs"] == 2 * g["n"] and g["identical"] == 1.0
    assert greedy["children"][0]["tasks"]["tiny_sums"]["generation"]["pairs"] == g["n"]
    out_g = [json.loads(x)["output_P"] for x in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    out_s = [json.loads(x)["output_P"] for x in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert out_g != out_s  # the sampled run was not served the greedy run's cached generations
    again = evaluate(str(tmp_path / "parent"), [str(tmp_path / "twin")], out=tmp_path / "s2", seed=7,
                     sample="temperature=1.5", samples=2, **common)
    out_7 = [json.loads(x)["output_P"] for x in (tmp_path / "s2" / "samples.jsonl").read_text().splitlines()]
    assert out_7 != out_s and again["children"][0]["tasks"]["tiny_sums"]["generation"]["identical"] == 1.0
    with pytest.raises(FlipcheckError, match="--sample"):
        evaluate(str(tmp_path / "parent"), [str(tmp_path / "twin")], sample="temperature=-1", **common)


def test_a_bad_sample_string_on_the_command_line_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app

    for bad in (["--sample", "temperature=0,top_p=2"], ["--samples", "4"]):
        res = CliRunner().invoke(app, ["eval", str(tiny_model_dir), str(tiny_model_dir), "--tasks", "x",
                                       "--cache-dir", str(tmp_path), *bad])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "--sample" in res.output, res.output
