"""Per-layer settings: schemes per layer for the quantizers, sparsity per layer for the pruners, an
explicit layer list for layer dropping. Everything runs for real through llm-compressor on a tiny
4-layer Llama (hidden 128, intermediate 256)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import build_calibration
from flipcheck.compressors.registry import get_method, make_config, parse_set_options
from flipcheck.errors import FlipcheckError
from flipcheck.models import save_model

LAYERS = 4
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep", "goat", "lion"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]


def documents(seed: int, n: int = 200) -> list[str]:
    """Sentences in the test tokenizer's vocabulary (see conftest.corpus)."""
    import random

    rng = random.Random(seed)
    return [f"The {rng.choice(ANIMALS)} saw a {rng.choice(COLORS)} ball and ran after it slowly." if i % 2 else
            f"Question: What color is the {rng.choice(ANIMALS)}?\nAnswer: It is {rng.choice(COLORS)}." for i in range(n)]


@pytest.fixture(scope="module")
def model4(tiny_tokenizer):
    from flipcheck.tiny import build_llama

    return build_llama(len(tiny_tokenizer), num_hidden_layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def calib(tiny_tokenizer):
    return build_calibration(tiny_tokenizer, CalibrationConfig(samples=8, seq_len=64, seed=0), texts=documents(0))


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return build_calibration(tiny_tokenizer, CalibrationConfig(samples=4, seq_len=48, seed=1), texts=documents(1)).input_ids


def decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def apply(method, model, settings, calib):
    child = copy.deepcopy(model)
    report = get_method(method).apply(child, make_config(method, settings), calib)
    return child, report


# --------------------------------------------------------------------------- settings


def test_layer_maps_parse_from_text_and_mappings_to_one_canonical_form():
    a = make_config("gptq", {"layers": "2-3:w4a16, 0-1:W8A16"})
    b = make_config("gptq", {"layers": {"0-1": "W8A16", " 2 - 3 ": "W4A16"}})
    c = make_config("gptq", parse_set_options(["layers={'0-1': W8A16, '2-3': W4A16}"]))
    assert a.layers == b.layers == c.layers == {"0-1": "W8A16", "2-3": "W4A16"}
    assert list(a.layers) == ["0-1", "2-3"] and a.model_dump(mode="json") == b.model_dump(mode="json")
    assert make_config("wanda", {"layers": "3:0.25,0:0.1"}).layers == {"0": 0.1, "3": 0.25}
    assert make_config("layer_drop", {"layers": "3,1-2"}).layers == [1, 2, 3]
    assert make_config("layer_drop", {"layers": [2, 0]}).layers == [0, 2]


@pytest.mark.parametrize("method, settings, fragments", [
    ("gptq", {"layers": "0-2:W8A16,2-3:W4A16"}, ["overlap", "0-2", "2-3"]),
    ("gptq", {"layers": "0-1:W3A16"}, ["W3A16", "allowed: W4A16, W4A16_ASYM, W8A16, W8A8, none"]),
    ("gptq", {"layers": "3-1:W8A16"}, ["end is below the start"]),
    ("gptq", {"layers": "a:W8A16"}, ["expected an index (5) or an inclusive range (0-3)"]),
    ("gptq", {"layers": "0-1=W8A16"}, ["RANGE:VALUE"]),
    ("rtn", {"layers": "0:W9"}, ["allowed:", "W8A16"]),
    ("wanda", {"layers": "0:1.5"}, ["0 <= sparsity < 1"]),
    ("wanda", {"layers": "0:0.3", "mask": "2:4"}, ["unstructured sparsity only"]),
    ("layer_drop", {"layers": "1", "n": 2}, ["exactly one of n", "layers"]),
    ("gptq", {"layer": "0:W8A16"}, ["unknown setting 'layer'"]),
])
def test_bad_per_layer_settings_fail_in_one_line_naming_the_allowed_values(method, settings, fragments):
    with pytest.raises(FlipcheckError) as err:
        make_config(method, settings)
    message = str(err.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, message


@pytest.mark.parametrize("method, settings", [("gptq", {"layers": "2-4:W8A16"}), ("wanda", {"layers": "7:0.2"}),
                                              ("layer_drop", {"layers": "4"})])
def test_layer_indices_beyond_the_model_fail_before_any_work(method, settings, model4, calib):
    child = copy.deepcopy(model4)
    before = {k: v.clone() for k, v in child.state_dict().items()}
    with pytest.raises(FlipcheckError, match=r"4 decoder layers; allowed: 0-3"):
        get_method(method).apply(child, make_config(method, settings), calib)
    assert all(torch.equal(before[k], v) for k, v in child.state_dict().items())


# --------------------------------------------------------------------------- quantizers


@pytest.fixture(scope="module")
def mixed_gptq(model4, calib):
    """GPTQ W4A16 g128 with layers 0-1 at W8A16: one oneshot, two config groups."""
    return apply("gptq", model4, {"scheme": "W4A16", "layers": {"0-1": "W8A16"}}, calib)


def test_mixed_gptq_quantizes_each_layer_with_its_scheme(mixed_gptq):
    child, report = mixed_gptq
    lins = decoder_linears(child)
    assert len(lins) == 7 * LAYERS
    for name, mod in lins.items():
        w = mod.quantization_scheme.weights
        assert w.num_bits == (8 if layer_of(name) < 2 else 4), name
        assert w.group_size == 128
        # the weight lies on its integer grid: W / s is whole within the range of its bits
        s = mod.weight_scale.repeat_interleave(128, dim=1)
        q = mod.weight / s
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 2 ** (w.num_bits - 1)
    assert getattr(child.lm_head, "quantization_scheme", None) is None
    # bits per weight: int8 on half the layers, int4 on the other half, one fp32 scale per 128 weights
    assert report.bits_per_weight == pytest.approx((8 + 4) / 2 + 32 / 128, rel=1e-9)
    assert report.config["layers"] == {"0-1": "W8A16"}


def _groups_by_module(config: dict, model) -> tuple[dict[str, int], list[str]]:
    """{decoder Linear: num_bits of the saved group whose targets match it}, via compressed-tensors."""
    from compressed_tensors import QuantizationConfig
    from compressed_tensors.utils import match_named_modules

    qc = QuantizationConfig.model_validate(config["quantization_config"])
    out: dict[str, int] = {}
    for scheme in qc.config_groups.values():
        for name, mod in match_named_modules(model, scheme.targets, qc.ignore):
            if isinstance(mod, torch.nn.Linear):
                assert name not in out, f"{name} matched by two groups"
                out[name] = scheme.weights.num_bits
    return out, qc.ignore


def test_mixed_child_saves_reloads_identically_and_its_config_maps_each_layer(mixed_gptq, model4, tiny_tokenizer, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    child, report = mixed_gptq
    with torch.no_grad():
        expected = child(ids).logits
    folder = save_model(child, tiny_tokenizer, tmp_path / "child", {"method": "gptq", "stats": report.to_dict()})
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"  # int4 and int8 both packed in int32
    assert len(config["quantization_config"]["config_groups"]) == 2
    by_module, ignore = _groups_by_module(config, model4)
    assert by_module == {n: 8 if layer_of(n) < 2 else 4 for n in decoder_linears(model4)}
    assert "lm_head" in ignore
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    for name, mod in decoder_linears(reloaded).items():
        assert mod.quantization_scheme.weights.num_bits == (8 if layer_of(name) < 2 else 4)


def test_rtn_none_leaves_a_layer_unquantized_and_saved_as_ignored(model4, tiny_tokenizer, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    child, report = apply("rtn", model4, {"scheme": "W4A16", "layers": "3:none,0:W8A16"}, None)
    lins = decoder_linears(child)
    for name, mod in lins.items():
        scheme = getattr(mod, "quantization_scheme", None)
        if layer_of(name) == 3:
            assert scheme is None and torch.equal(mod.weight, model4.get_submodule(name).weight)
        else:
            assert scheme.weights.num_bits == (8 if layer_of(name) == 0 else 4)
    assert report.extra["quantized_linears"] == 7 * (LAYERS - 1)
    folder = save_model(child, tiny_tokenizer, tmp_path / "rtn", {"method": "rtn"})
    config = json.loads((folder / "config.json").read_text())
    by_module, ignore = _groups_by_module(config, model4)
    assert by_module == {n: 8 if layer_of(n) == 0 else 4 for n in lins if layer_of(n) != 3}
    with torch.no_grad():
        expected = child(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits, expected)


def test_a_per_layer_map_naming_the_base_scheme_everywhere_equals_the_uniform_child(model4, ids):
    uniform, _ = apply("rtn", model4, {"scheme": "W4A16"}, None)
    mapped, _ = apply("rtn", model4, {"scheme": "W8A16", "layers": {"0-3": "W4A16"}}, None)
    with torch.no_grad():
        assert torch.equal(uniform(ids).logits, mapped(ids).logits)


def test_awq_per_layer_schemes_and_none(model4, calib):
    """AWQ with layer 0 at W8A16 and layer 3 left alone: each layer's Linears carry their own scheme,
    layer 3's weights are the parent's bit for bit, the others lie on their integer grids; with a map
    that names the default scheme everywhere AWQ gives the uniform child's weights."""
    child, report = apply("awq", model4, {"layers": "0:W8A16,3:none"}, calib)
    for name, mod in decoder_linears(child).items():
        scheme = getattr(mod, "quantization_scheme", None)
        if layer_of(name) == 3:
            assert scheme is None and torch.equal(mod.weight, model4.get_submodule(name).weight), name
            continue
        w = scheme.weights
        assert (w.num_bits, w.symmetric) == ((8, True) if layer_of(name) == 0 else (4, False)), name
    assert report.extra["quantized_linears"] == 7 * (LAYERS - 1)
    assert report.config["layers"] == {"0": "W8A16", "3": "none"}
    uniform, _ = apply("awq", model4, {}, calib)
    mapped, _ = apply("awq", model4, {"scheme": "W8A16", "layers": {"0-3": "W4A16_ASYM"}}, calib)
    for name, mod in decoder_linears(uniform).items():
        assert torch.equal(mod.weight, mapped.get_submodule(name).weight), name
    with pytest.raises(FlipcheckError, match="allowed: W4A16_ASYM, W4A16, W8A16, none"):
        make_config("awq", {"layers": "0:W8A8"})


# --------------------------------------------------------------------------- pruners and layer dropping


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_per_layer_sparsity_is_what_each_layer_gets(method, model4, calib):
    child, report = apply(method, model4, {"sparsity": 0.5, "layers": {"0": 0.25, "3": 0.0}}, calib)
    want = {0: 0.25, 1: 0.5, 2: 0.5, 3: 0.0}
    for name, mod in decoder_linears(child).items():
        i = layer_of(name)
        frac = float((mod.weight == 0).float().mean())
        # wanda zeroes floor(s * in_features) per row; sparsegpt up to one more weight per 128-column block
        assert want[i] - 0.01 <= frac <= want[i] + 2 / 128 + 1e-9, (name, frac)
        if i == 3:
            assert torch.equal(mod.weight, model4.get_submodule(name).weight)
    assert report.config["layers"] == {"0": 0.25, "3": 0.0}


def test_layer_drop_removes_exactly_the_listed_layers(model4, ids):
    child, report = apply("layer_drop", model4, {"layers": "1,3"}, None)
    assert child.config.num_hidden_layers == 2 and report.extra["dropped_layers"] == [1, 3]
    assert report.extra["selection"] == "explicit"
    for new, old in enumerate([0, 2]):
        a, b = child.model.layers[new].state_dict(), model4.model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    with torch.no_grad():
        assert torch.isfinite(child(ids).logits).all()


# --------------------------------------------------------------------------- --set, flipcheck.json, made_with


def test_set_options_reach_the_childs_flipcheck_json(model4, tiny_tokenizer, tmp_path):
    from flipcheck.commands.compress import steps_from_options
    from flipcheck.compressors.pipeline import compress

    parent = tmp_path / "parent"
    model4.save_pretrained(parent)
    tiny_tokenizer.save_pretrained(parent)
    steps = steps_from_options(["rtn"], parse_set_options(["scheme=W4A16", "layers=1-3:W8A16"]))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = compress(str(parent), steps, out=tmp_path / "child", device="cpu")
    finally:
        os.chdir(cwd)
    prov = json.loads((res.out / "flipcheck.json").read_text())
    assert prov["recipe"][0]["settings"]["layers"] == {"1-3": "W8A16"}


def test_made_with_keys_on_the_per_layer_map():
    from flipcheck.recipes.runner import made_with
    from flipcheck.recipes.schema import ChildSpec, Recipe, StepSpec

    def key(layers):
        spec = ChildSpec(name="c", steps=[StepSpec(method="rtn", settings={"scheme": "W4A16", "layers": layers})])
        recipe = Recipe(name="r", parent="p", steps=spec.steps)
        return made_with(spec, "fp", recipe)

    assert key("0-1:W8A16") == key({"0-1": "w8a16"})  # one child however the map is spelled
    assert key("0-1:W8A16") != key("0-2:W8A16") and key("0-1:W8A16") != key(None)
