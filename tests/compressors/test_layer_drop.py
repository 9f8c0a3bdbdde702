"""Layer dropping: identity at n=0, exact truncation, stock save/reload, KV cache, angular choice."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flipcheck.compressors.calibration import Calibration
from flipcheck.compressors.layer_drop import (
    LayerDropConfig,
    angular_distance,
    angular_distances,
    apply_layer_drop,
    choose_block,
    layers_to_drop,
    needs_calibration,
)
from flipcheck.compressors.registry import get_method, make_config
from flipcheck.errors import FlipcheckError
from flipcheck.tiny import build_llama

ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]


def token_rows(tokenizer, n: int, length: int, offset: int = 0) -> torch.Tensor:
    """(n, length) token ids cut from simple sentences in the tiny tokenizer's vocabulary."""
    sentences = [f"The {a} saw a {c} ball and ran after it slowly." for a in ANIMALS for c in COLORS]
    ids = tokenizer(" ".join(sentences[offset:] + sentences[:offset]))["input_ids"]
    assert len(ids) >= n * length
    return torch.tensor(ids[: n * length]).reshape(n, length)


@pytest.fixture(scope="module")
def parent(tiny_tokenizer):
    return build_llama(len(tiny_tokenizer), num_hidden_layers=4, seed=1)


@pytest.fixture(scope="module")
def calib(tiny_tokenizer):
    return Calibration(tokenizer=tiny_tokenizer, input_ids=token_rows(tiny_tokenizer, 4, 24))


@pytest.fixture(scope="module")
def probe(tiny_tokenizer):
    return token_rows(tiny_tokenizer, 2, 16, offset=7)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_n0_reproduces_parent(parent, probe):
    child = copy.deepcopy(parent)
    report = apply_layer_drop(child, LayerDropConfig(n=0), None)
    assert torch.equal(logits(child, probe), logits(parent, probe))
    assert report.extra["dropped_layers"] == [] and report.parameters == report.extra["parameters_before"]


@pytest.mark.parametrize("n", [1, 2])
def test_drop_last_equals_a_model_built_with_fewer_layers(parent, probe, n):
    from transformers import AutoModelForCausalLM

    child = copy.deepcopy(parent)
    report = apply_layer_drop(child, LayerDropConfig(n=n), Calibration(tokenizer=None))
    keep = 4 - n
    cfg = copy.deepcopy(parent.config)
    cfg.num_hidden_layers = keep
    hand = AutoModelForCausalLM.from_config(cfg).eval()
    state = {
        k: v
        for k, v in parent.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep
    }
    hand.load_state_dict(state, strict=True)
    assert torch.equal(logits(child, probe), logits(hand, probe))
    assert report.extra["dropped_layers"] == list(range(keep, 4))
    assert report.calibration is None
    assert report.parameters == sum(p.numel() for p in child.parameters())
    per_layer = sum(p.numel() for p in parent.model.layers[0].parameters())
    assert report.extra["parameters_before"] - report.parameters == n * per_layer
    assert report.targeted == 7 * n


def test_layers_to_drop_rounds_the_fraction():
    assert layers_to_drop(LayerDropConfig(fraction=0.5), 4) == 2
    assert layers_to_drop(LayerDropConfig(fraction=0.3), 4) == 1  # 1.2 -> 1
    assert layers_to_drop(LayerDropConfig(fraction=0.375), 4) == 2  # 1.5 -> 2 (half up)
    assert layers_to_drop(LayerDropConfig(fraction=0.25), 32) == 8
    assert layers_to_drop(LayerDropConfig(n=3), 4) == 3


def test_bad_settings_fail_before_any_work(parent):
    import flipcheck.compressors.layer_drop  # noqa: F401  (registers the method)

    assert get_method("layer_drop").config_cls is LayerDropConfig
    with pytest.raises(FlipcheckError, match="exactly one of n"):
        make_config("layer_drop", {"n": 1, "fraction": 0.25})
    with pytest.raises(FlipcheckError, match="exactly one of n"):
        make_config("layer_drop", {})
    with pytest.raises(FlipcheckError, match="fraction"):
        make_config("layer_drop", {"fraction": "1.2"})
    with pytest.raises(FlipcheckError, match="n: "):
        make_config("layer_drop", {"n": -1})
    with pytest.raises(FlipcheckError, match="'last' or 'angular'"):
        make_config("layer_drop", {"n": 1, "selection": "middle"})
    with pytest.raises(FlipcheckError, match="unknown setting 'layer'"):
        make_config("layer_drop", {"layer": 1})
    assert make_config("layer_drop", {"layers": 1}).layers == [1]  # an explicit list (issue 16)
    child = copy.deepcopy(parent)
    # n >= layers is caught before the (missing) calibration data is even looked at
    with pytest.raises(FlipcheckError, match=r"n=4 would drop every layer.*allowed: n in 0\.\.3"):
        apply_layer_drop(child, LayerDropConfig(n=4, selection="angular"), None)
    with pytest.raises(FlipcheckError, match="fraction=0.9"):
        apply_layer_drop(child, LayerDropConfig(fraction=0.9), None)
    with pytest.raises(FlipcheckError, match="needs calibration data"):
        apply_layer_drop(child, LayerDropConfig(n=1, selection="angular"), Calibration(tokenizer=None))
    with pytest.raises(FlipcheckError, match="precomputed distances have shape"):
        apply_layer_drop(child, LayerDropConfig(n=1, selection="angular"), None, distances=torch.zeros(3, 3))
    assert len(child.model.layers) == 4 and child.config.num_hidden_layers == 4


def test_needs_calibration():
    assert not needs_calibration(LayerDropConfig(n=2))
    assert needs_calibration(LayerDropConfig(n=2, selection="angular"))
    assert not needs_calibration(LayerDropConfig(n=0, selection="angular"))


def test_angular_distance_formula():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([0.5, 1.0, 0.0, 0.25], dtype=torch.float64)  # 90, 180, 0, 45 degrees / 180
    torch.testing.assert_close(angular_distance(a, b), expected, atol=1e-12, rtol=0)


def test_choose_block_argmin_and_ties():
    nan = float("nan")
    d = torch.tensor(
        [
            [0.0, 0.3, 0.4, 0.5],
            [0.0, 0.1, 0.2, 0.5],
            [0.0, 0.1, 0.3, nan],
            [0.0, 0.2, nan, nan],
        ]
    )
    assert choose_block(d, 1) == 1  # tie between l=1 and l=2 goes to the shallowest
    assert choose_block(d, 2) == 1
    assert choose_block(d, 3) == 0
    assert choose_block(d, 0) == 0
    with pytest.raises(ValueError):
        choose_block(d, 4)


@pytest.fixture(scope="module")
def planted(tiny_tokenizer):
    """6 layers; layers 2 and 3 write nothing into the residual stream (o_proj, down_proj zeroed)."""
    model = build_llama(len(tiny_tokenizer), num_hidden_layers=6, seed=2)
    for i in (2, 3):
        model.model.layers[i].self_attn.o_proj.weight.data.zero_()
        model.model.layers[i].mlp.down_proj.weight.data.zero_()
    return model


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_angular_distances_match_hidden_states(planted, calib, tokens):
    """Entries with l+n < L reproduced from output_hidden_states (pre-norm for those indices)."""
    ids = calib.input_ids
    d = angular_distances(planted, ids, tokens=tokens, batch_size=3)
    assert d.shape == (6, 6)
    with torch.no_grad():
        hs = planted(ids, output_hidden_states=True).hidden_states
    for l in range(6):  # noqa: E741
        for n in range(6):
            if l + n > 6:
                assert math.isnan(d[l, n])
            elif l + n < 6:
                a, b = hs[l].double(), hs[l + n].double()
                if tokens == "last":
                    a, b = a[:, -1], b[:, -1]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
                expected = (torch.arccos(cos) / math.pi).mean()
                assert abs(float(d[l, n]) - float(expected)) < 2e-4, (l, n)
    assert float(d[2, 2]) == 0.0  # the planted identity block
    assert (d[:, 0] == 0).all()


def test_angular_picks_the_planted_block(planted, calib, probe):
    child = copy.deepcopy(planted)
    report = apply_layer_drop(child, LayerDropConfig(n=2, selection="angular"), calib)
    assert report.extra["dropped_layers"] == [2, 3]
    assert report.extra["angular_distance"] == 0.0
    assert report.calibration is not None and report.calibration["tokens"] == calib.input_ids.numel()
    # the dropped layers were identities, so the function is unchanged
    torch.testing.assert_close(logits(child, probe), logits(planted, probe), atol=1e-5, rtol=0)
    # precomputed distances give the same choice without a calibration pass
    d = angular_distances(planted, calib.input_ids)
    again = copy.deepcopy(planted)
    report2 = apply_layer_drop(again, LayerDropConfig(n=2, selection="angular"), None, distances=d)
    assert report2.extra["dropped_layers"] == [2, 3]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dropped_middle_saves_reloads_and_caches(tmp_path, tiny_tokenizer, probe, model_type):
    from transformers import AutoModelForCausalLM

    model = build_llama(len(tiny_tokenizer), num_hidden_layers=5, seed=3, model_type=model_type)
    report = apply_layer_drop(
        model, LayerDropConfig(n=2, selection="angular"), None, distances=_prefer(5, start=1, n=2)
    )
    assert report.extra["dropped_layers"] == [1, 2]
    assert [ly.self_attn.layer_idx for ly in model.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    if model_type == "qwen2":
        assert len(model.config.layer_types) == 3
    model.save_pretrained(tmp_path / "child")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "child", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    assert torch.equal(logits(reloaded, probe), logits(model, probe))
    # incremental decoding through the KV cache matches the full forward
    with torch.no_grad():
        out = model(probe[:, :-1], use_cache=True)
        step = model(probe[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, logits(model, probe)[:, -1], atol=1e-5, rtol=1e-5)
    cached = model.generate(probe[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(probe[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == probe.shape[1] + 6 and torch.equal(cached, uncached)


def _prefer(num_layers: int, start: int, n: int) -> torch.Tensor:
    """A distance matrix whose minimum for `n` is at `start`."""
    d = torch.ones(num_layers, num_layers, dtype=torch.float64)
    d[:, 0] = 0
    d[start, n] = 0.01
    return d
