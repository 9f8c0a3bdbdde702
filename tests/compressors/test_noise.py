"""The noise method and the registry's validation, on a tiny in-process Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from flipcheck.compressors import get_method, make_config
from flipcheck.compressors.noise import NoiseConfig, apply_noise, module_seed
from flipcheck.compressors.registry import parse_set_options
from flipcheck.errors import FlipcheckError


def _logits(model, tok):
    ids = torch.tensor([tok("Question: What color is the dog?\nAnswer: The dog is red.").input_ids])
    with torch.no_grad():
        return model(ids).logits


def test_sigma_zero_reproduces_parent_logits(tiny_model, tiny_tokenizer):
    child = copy.deepcopy(tiny_model)
    report = apply_noise(child, NoiseConfig(sigma=0.0), None)
    assert torch.equal(_logits(child, tiny_tokenizer), _logits(tiny_model, tiny_tokenizer))
    assert report.targeted == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_noise_is_sigma_times_std_per_module_and_spares_embeddings_and_head(tiny_model):
    child = copy.deepcopy(tiny_model)
    apply_noise(child, NoiseConfig(sigma=0.5, seed=3), None)
    parent_w = dict(tiny_model.named_parameters())
    for name, p in child.named_parameters():
        delta = p.detach() - parent_w[name].detach()
        if name.endswith("proj.weight"):
            std = parent_w[name].detach().std()
            # the noise has std sigma*std(W): within sampling error for tens of thousands of draws
            assert delta.std().item() == pytest.approx(0.5 * std.item(), rel=0.05)
            gen = torch.Generator().manual_seed(module_seed(3, name.removesuffix(".weight")))
            expected = 0.5 * std * torch.randn(p.shape, generator=gen)
            assert torch.allclose(delta, expected, atol=1e-6)
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name


def test_noise_is_seeded_by_module_name_not_visit_order(tiny_model):
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    apply_noise(a, NoiseConfig(sigma=0.1, seed=1), None)
    apply_noise(b, NoiseConfig(sigma=0.1, seed=1, include=["*mlp*"]), None)
    apply_noise(b, NoiseConfig(sigma=0.1, seed=1, exclude=["*mlp*"]), None)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_bad_settings_fail_before_any_work():
    with pytest.raises(FlipcheckError, match="sigma"):
        make_config("noise", {"sigma": "-0.1"})
    with pytest.raises(FlipcheckError, match="unknown setting 'sigmaa'"):
        make_config("noise", {"sigmaa": "0.1"})
    with pytest.raises(FlipcheckError, match="unknown method 'nosie'.*Did you mean: noise"):
        get_method("nosie")
    with pytest.raises(FlipcheckError, match="key=value"):
        parse_set_options(["sigma"])
    assert make_config("noise", parse_set_options(["sigma=0.05"])).sigma == 0.05
