"""The llm-compressor methods (gptq, awq, smoothquant, rtn, wanda, sparsegpt) on a tiny Llama.

Every method runs for real through llm-compressor on CPU. One contract table drives the same
checks for all of them (forward, stats read off the tensors, integer grid or sparsity pattern,
save -> reload with identical logits); then invariants (sparsity 0 is the parent), early errors,
and relative quality against simple baselines on held-out text.
"""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass

import pytest
import torch

import flipcheck.compressors.awq  # noqa: F401  (registers the method)
import flipcheck.compressors.gptq  # noqa: F401
import flipcheck.compressors.rtn  # noqa: F401
import flipcheck.compressors.smoothquant  # noqa: F401
import flipcheck.compressors.sparsegpt  # noqa: F401
import flipcheck.compressors.wanda  # noqa: F401
from flipcheck.compressors import llmc
from flipcheck.compressors.calibration import Calibration, CalibrationConfig
from flipcheck.compressors.calibration_data import build_calibration
from flipcheck.compressors.gptq import GPTQConfig
from flipcheck.compressors.registry import get_method, make_config
from flipcheck.compressors.rtn import RTNConfig
from flipcheck.compressors.stats import count_parameters
from flipcheck.compressors.wanda import WandaConfig
from flipcheck.errors import FlipcheckError
from flipcheck.models import fingerprint, load_model, save_model

ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep", "goat", "lion"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def documents(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, c = rng.choice(ANIMALS), rng.choice(COLORS)
        docs.append(
            rng.choice(
                [
                    f"The {a} saw a {c} ball and ran after it slowly.",
                    f"Question: What color is the {a}?\nAnswer: The {a} is {c}.",
                    f"{rng.randrange(10)} {rng.randrange(10)} = {rng.randrange(19)}",
                ]
            )
        )
    return docs


@pytest.fixture(scope="module")
def calib(tiny_tokenizer) -> Calibration:
    return build_calibration(tiny_tokenizer, CalibrationConfig(samples=16, seq_len=64, seed=0), texts=documents(0))


@pytest.fixture(scope="module")
def held_out(tiny_tokenizer) -> torch.Tensor:
    """Inputs no method calibrated on: other documents, other offsets."""
    cal = build_calibration(tiny_tokenizer, CalibrationConfig(samples=8, seq_len=64, seed=1), texts=documents(1))
    return cal.input_ids


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LINEARS]


# --------------------------------------------------------------------------- the contract table


def bits_w4_g128(shape):  # int4 + one fp32 scale per 128 weights
    out, cols = shape
    return out * cols * 4 + out * (cols // 128) * 32


def bits_w4_g128_asym(shape):  # ... + one 4-bit zero point per group
    out, cols = shape
    return bits_w4_g128(shape) + out * (cols // 128) * 4


def bits_w8_channel(shape):  # int8 + one fp32 scale per output row
    out, cols = shape
    return out * cols * 8 + out * 32


def bits_dense(shape):
    return shape[0] * shape[1] * 32


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    settings: dict
    bits: object  # hand formula: weight shape -> bits in the checkpoint
    grid: tuple[int, bool] | None = None  # (num_bits, symmetric) of the integer grid
    sparsity: float | None = None  # exact target for pruning
    nm: tuple[int, int] | None = None  # (kept N, of M)
    fmt: str | None = None  # quantization_config.format on disk
    preset: str | None = None  # the compressed-tensors preset the saved config_groups must equal


CASES = [
    Case("gptq-w4g128", "gptq", {}, bits_w4_g128, grid=(4, True), fmt="pack-quantized", preset="W4A16"),
    Case("gptq-w8a8", "gptq", {"scheme": "W8A8"}, bits_w8_channel, grid=(8, True), fmt="int-quantized", preset="W8A8"),
    Case("awq-w4g128", "awq", {"n_grid": 4}, bits_w4_g128_asym, grid=(4, False), fmt="pack-quantized", preset="W4A16_ASYM"),
    Case("smoothquant-w8a8", "smoothquant", {"alpha": 0.5}, bits_w8_channel, grid=(8, True), fmt="int-quantized", preset="W8A8"),
    Case("rtn-w4g128", "rtn", {"scheme": "W4A16"}, bits_w4_g128, grid=(4, True), fmt="pack-quantized", preset="W4A16"),
    Case("rtn-w8a8", "rtn", {"scheme": "W8A8"}, bits_w8_channel, grid=(8, True), fmt="int-quantized", preset="W8A8"),
    Case("wanda-50", "wanda", {"sparsity": 0.5}, bits_dense, sparsity=0.5),
    Case("wanda-2:4", "wanda", {"mask": "2:4"}, bits_dense, nm=(2, 4)),
    Case("sparsegpt-4:8", "sparsegpt", {"mask": "4:8"}, bits_dense, nm=(4, 8)),
    Case("sparsegpt-30", "sparsegpt", {"sparsity": 0.3}, bits_dense, sparsity=0.3),
]


def case_named(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


@pytest.fixture(scope="module")
def children(tiny_model, calib, tmp_path_factory):
    """Each case applied once to a fresh copy of the parent, from an empty working directory."""
    cache: dict[str, tuple] = {}

    def get(case: Case):
        if case.id not in cache:
            model = copy.deepcopy(tiny_model)
            name_or_path = model.config._name_or_path
            cwd, work = os.getcwd(), tmp_path_factory.mktemp("cwd")
            os.chdir(work)
            try:
                report = get_method(case.method).apply(model, make_config(case.method, case.settings), calib)
            finally:
                os.chdir(cwd)
            assert os.listdir(work) == [], "oneshot wrote into the working directory"
            assert model.config._name_or_path == name_or_path
            cache[case.id] = (model, report)
        return cache[case.id]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_and_stats_match_tensors(case, children, tiny_model, calib, held_out):
    child, report = children(case)
    out = logits(child, held_out)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, logits(tiny_model, held_out)), "the method changed nothing"

    layers = linears(child)
    assert report.method == case.method and report.targeted == len(layers) == 14
    # bits: the hand formula per layer shape, averaged over weights
    expected_bits = sum(case.bits(tuple(m.weight.shape)) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
    assert report.bits_per_weight == pytest.approx(expected_bits, rel=1e-12)
    # sparsity: zeros counted here
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
    assert report.sparsity == pytest.approx(zeros, abs=1e-12)
    # parameters: the parent's weights (scales and zero points are counted in the bits)
    assert report.parameters == count_parameters(tiny_model)
    needs = get_method(case.method).needs_data(make_config(case.method, case.settings))
    assert report.calibration == (calib.describe() if needs else None)
    assert report.config == make_config(case.method, case.settings).model_dump()


def _grid_codes(mod, num_bits: int, symmetric: bool) -> torch.Tensor:
    """W / s (+ z) per group, checked to be integers in range; returns them."""
    w, s = mod.weight.detach(), mod.weight_scale.detach()
    rows, cols = w.shape
    groups = s.shape[1]
    q = w.reshape(rows, groups, cols // groups) / s.unsqueeze(-1)
    if not symmetric:
        q = q + mod.weight_zero_point.detach().float().unsqueeze(-1)
    assert (q - q.round()).abs().max() < 1e-3, "weights are not on the integer grid"
    q = q.round()
    # compressed-tensors keeps codes signed for both: q in [-2^(b-1), 2^(b-1) - 1], z an integer
    assert -(2 ** (num_bits - 1)) <= q.min() and q.max() <= 2 ** (num_bits - 1) - 1
    return q


@pytest.mark.parametrize("case", [c for c in CASES if c.grid], ids=[c.id for c in CASES if c.grid])
def test_quantized_weights_lie_on_the_integer_grid(case, children):
    child, _ = children(case)
    num_bits, symmetric = case.grid
    for _, mod in linears(child):
        q = _grid_codes(mod, num_bits, symmetric)
        srt = q.sort(dim=-1).values
        levels = 1 + (srt.diff(dim=-1) != 0).sum(dim=-1)
        assert levels.max() <= 2**num_bits
        if num_bits == 4:
            assert mod.weight_scale.shape == (mod.out_features, mod.in_features // 128)


@pytest.mark.parametrize("case", [c for c in CASES if c.sparsity or c.nm], ids=[c.id for c in CASES if c.sparsity or c.nm])
def test_sparsity_pattern(case, children, tiny_model):
    child, report = children(case)
    for name, mod in linears(child):
        w = mod.weight.detach()
        rows, cols = w.shape
        if case.nm:
            n, m = case.nm
            zeros = (w.reshape(rows, cols // m, m) == 0).sum(-1)
            assert torch.all(zeros == m - n), f"{name}: not {n}:{m} in every group"
        elif case.method == "wanda":  # per row: exactly floor(sparsity * cols) zeros
            assert torch.all((w == 0).sum(1) == int(case.sparsity * cols)), name
        else:  # SparseGPT thresholds per block of 128 columns: the target plus at most one per block
            frac = float((w == 0).float().mean())
            assert case.sparsity <= frac <= case.sparsity + (cols // 128) / w.numel() + 1e-9, name
    target = case.sparsity if case.sparsity is not None else (case.nm[1] - case.nm[0]) / case.nm[1]
    assert report.sparsity == pytest.approx(target, abs=1 / 128)
    # pruning zeroes weights and leaves the rest of the model alone
    assert torch.equal(child.lm_head.weight, tiny_model.lm_head.weight)
    assert torch.equal(child.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_save_reload_identical_logits(case, children, tiny_tokenizer, held_out, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    child, report = children(case)
    expected = logits(child, held_out)
    folder = save_model(child, tiny_tokenizer, tmp_path / "child", {"method": case.method, "stats": report.to_dict()})
    assert torch.equal(logits(child, held_out), expected), "saving changed the model in memory"

    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if case.fmt == "pack-quantized":  # eight int4 values per int32
            packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
            assert packed.dtype == torch.int32 and tuple(packed.shape) == (128, 256 // 8)
        elif case.fmt == "int-quantized":
            assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.int8
    if case.fmt:
        assert config["quantization_config"]["format"] == case.fmt
        assert config["quantization_config"]["ignore"] == ["lm_head"]
        assert saved_layouts(config) == [preset_layout(case.preset)]  # what serving engines read
    else:
        assert "quantization_config" not in config
        assert "model.layers.0.mlp.down_proj.weight" in keys

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(reloaded, held_out), expected)
    again = load_model(folder, device="cpu")
    assert torch.equal(logits(again, held_out), expected)


# --------------------------------------------------------------------------- invariants and errors


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsity_zero_reproduces_the_parent(method, tiny_model, calib, held_out):
    model = copy.deepcopy(tiny_model)
    config = make_config(method, {"sparsity": 0})
    assert not get_method(method).needs_data(config)
    report = get_method(method).apply(model, config, calib)
    assert torch.equal(logits(model, held_out), logits(tiny_model, held_out))
    assert report.sparsity == 0.0 and report.bits_per_weight == 32.0 and report.calibration is None


@pytest.mark.parametrize(
    "method, settings, fragments",
    [
        ("gptq", {"scheme": "W3A5"}, ["scheme", "W4A16", "W8A16"]),
        ("rtn", {"scheme": "INT3"}, ["unknown scheme 'INT3'", "W4A16_ASYM", "FP8_DYNAMIC"]),
        ("wanda", {"sparsity": 1.5}, ["sparsity", "less than 1"]),
        ("sparsegpt", {"sparsity": -0.1}, ["sparsity", "greater than or equal to 0"]),
        ("wanda", {"mask": "3:2"}, ["mask", "N < M"]),
        ("sparsegpt", {"mask": "2-4"}, ["mask", "N:M"]),
        ("wanda", {"mask": "2:4", "sparsity": 0.3}, ["conflicts with mask"]),
        ("gptq", {"actorder": "group"}, ["actorder", "allowed: none, weight"]),
        ("gptq", {"group_size": 0}, ["group_size"]),
        ("rtn", {"scheme": "FP8", "group_size": 64}, ["fixed weight layout", "W8A16"]),
        ("awq", {"n_grid": 3}, ["n_grid", "greater than or equal to 4"]),
        ("smoothquant", {"alpha": 1.5}, ["alpha", "less than or equal to 1"]),
        ("gptq", {"bits": 4}, ["unknown setting 'bits'"]),
    ],
)
def test_bad_settings_fail_with_the_setting_named(method, settings, fragments):
    with pytest.raises(FlipcheckError) as err:
        make_config(method, settings)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "method, settings, fragments",
    [
        ("gptq", {"group_size": 96}, ["group_size=96", "model.layers.0.self_attn.q_proj", "in_features=128", "32, 64, 128"]),
        ("awq", {"group_size": 256}, ["group_size=256", "in_features=128", "32, 64, 128", "group_size=None"]),
        ("rtn", {"scheme": "W8A16", "group_size": 96}, ["group_size=96", "model.layers.0.self_attn.q_proj"]),
        ("wanda", {"mask": "3:7"}, ["mask='3:7'", "in_features=128", "M=7"]),
    ],
)
def test_shapes_checked_before_any_work(method, settings, fragments, tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model)
    before = fingerprint(model)
    no_data = Calibration(tokenizer=tiny_tokenizer, input_ids=None)  # the check needs none
    with pytest.raises(FlipcheckError) as err:
        get_method(method).apply(model, make_config(method, settings), no_data)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert fingerprint(model) == before


def test_static_activation_scheme_asks_for_calibration(tiny_model, tiny_tokenizer):
    assert not get_method("rtn").needs_data(RTNConfig(scheme="W4A16"))
    assert not get_method("rtn").needs_data(RTNConfig(scheme="FP8_DYNAMIC"))
    assert get_method("rtn").needs_data(RTNConfig(scheme="FP8"))
    model = copy.deepcopy(tiny_model)
    with pytest.raises(FlipcheckError, match="FP8_DYNAMIC"):
        get_method("rtn").apply(model, RTNConfig(scheme="FP8"), Calibration(tokenizer=tiny_tokenizer))


def test_modifiers_for_unknown_method():
    with pytest.raises(FlipcheckError, match="not an llm-compressor method"):
        llmc.modifiers_for("noise", GPTQConfig())


def test_chain_runs_in_one_oneshot_and_reports_the_tensors(tiny_model, calib, held_out):
    model = copy.deepcopy(tiny_model)
    steps = [("wanda", WandaConfig(mask="2:4")), ("gptq", GPTQConfig())]
    reports = llmc.apply_chain(model, steps, calib)
    assert [r.method for r in reports] == ["wanda", "gptq"]
    assert all(r.extra["oneshot_chain"] == ["wanda", "gptq"] for r in reports)
    layers = linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
    assert all(r.sparsity == pytest.approx(zeros) for r in reports)
    # both steps ran: int4 weights on the grid, and far more zeros than GPTQ alone leaves (~0.15)
    assert reports[1].bits_per_weight == pytest.approx(4.25)
    assert zeros > 0.3
    for _, mod in layers:
        _grid_codes(mod, 4, True)
    assert torch.isfinite(logits(model, held_out)).all()


# --------------------------------------------------------------------------- relative quality


@torch.no_grad()
def output_error(model, parent_logits, ids) -> float:
    return float((logits(model, ids) - parent_logits).pow(2).mean())


@torch.no_grad()
def plant_outliers(model, channels=(3, 17, 50, 101), factor=40.0):
    """Scale a few channels of every norm's weight up and the matching input columns of the
    Linears it feeds down: the function is unchanged, the activations get outlier channels."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, consumers in (
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            norm.weight[list(channels)] *= factor
            for lin in consumers:
                lin.weight[:, list(channels)] /= factor
    return model


@torch.no_grad()
def rescale_channels(model, sigma=1.0, seed=0):
    """Function-preserving per-channel rescaling of every Linear's input (log-normal factors d):
    norm weight * d with the next Linears' columns / d; v_proj rows * d with o_proj columns / d;
    up_proj rows * d with down_proj columns / d. |W|·||X|| is unchanged, |W| alone is not."""
    gen = torch.Generator().manual_seed(seed)

    def factors(n):
        return torch.exp(sigma * torch.randn(n, generator=gen))

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, consumers in (
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            d = factors(norm.weight.numel())
            norm.weight.mul_(d)
            for lin in consumers:
                lin.weight.div_(d)
        for producer, consumer in ((attn.v_proj, attn.o_proj), (mlp.up_proj, mlp.down_proj)):
            d = factors(producer.out_features)
            producer.weight.mul_(d[:, None])
            consumer.weight.div_(d)
    return model


@torch.no_grad()
def magnitude_prune(model, sparsity):
    """Baseline: zero the smallest |W| in each row of every decoder Linear."""
    for _, mod in linears(model):
        k = int(sparsity * mod.in_features)
        idx = mod.weight.abs().argsort(dim=1)[:, :k]
        mod.weight.scatter_(1, idx, 0.0)
    return model


def test_gptq_beats_rtn_at_w4a16_g128(children, tiny_model, held_out):
    ref = logits(tiny_model, held_out)
    gptq = output_error(children(case_named("gptq-w4g128"))[0], ref, held_out)
    rtn = output_error(children(case_named("rtn-w4g128"))[0], ref, held_out)
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_smoothquant_beats_plain_w8a8_on_outlier_channels(tiny_model, calib, held_out):
    parent = plant_outliers(copy.deepcopy(tiny_model))
    ref = logits(parent, held_out)
    assert torch.allclose(ref, logits(tiny_model, held_out), atol=1e-4)  # same function

    def error(method, settings):
        model = copy.deepcopy(parent)
        get_method(method).apply(model, make_config(method, settings), calib)
        return output_error(model, ref, held_out)

    smooth = error("smoothquant", {"alpha": 0.5})
    plain_gptq = error("gptq", {"scheme": "W8A8", "group_size": None})  # same rounding, no smoothing
    plain_rtn = error("rtn", {"scheme": "W8A8"})
    assert smooth < 0.1 * plain_gptq and smooth < 0.1 * plain_rtn, (smooth, plain_gptq, plain_rtn)


def test_wanda_beats_magnitude_pruning_at_equal_sparsity(tiny_model, calib, held_out):
    parent = rescale_channels(copy.deepcopy(tiny_model))
    ref = logits(parent, held_out)
    assert torch.allclose(ref, logits(tiny_model, held_out), atol=1e-4)  # same function

    wanda = copy.deepcopy(parent)
    report = get_method("wanda").apply(wanda, WandaConfig(sparsity=0.5), calib)
    magnitude = magnitude_prune(copy.deepcopy(parent), 0.5)
    zeros = sum(int((m.weight == 0).sum()) for _, m in linears(magnitude)) / sum(m.weight.numel() for _, m in linears(magnitude))
    assert report.sparsity == pytest.approx(zeros)  # equal sparsity
    e_wanda, e_magnitude = output_error(wanda, ref, held_out), output_error(magnitude, ref, held_out)
    assert e_wanda < 0.5 * e_magnitude, (e_wanda, e_magnitude)


# --------------------------------------------------------------------------- schemes = presets

# how a scheme is calibrated or ordered, not how its checkpoint is laid out
_NOT_LAYOUT = ("observer", "observer_kwargs", "actorder")


def _layout(scheme) -> dict:
    scheme = scheme.model_dump()
    out = {"targets": scheme["targets"]}
    for part in ("weights", "input_activations", "output_activations"):
        args = scheme.get(part)
        out[part] = None if args is None else {k: v for k, v in args.items() if k not in _NOT_LAYOUT}
    return out


def preset_layout(preset: str, group_size: int | None = None) -> dict:
    """The compressed-tensors preset, group-wise with `group_size` where the user chose one."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"]) if group_size is None else llmc.quant_scheme(preset, group_size)
    return _layout(scheme)


def saved_layouts(config: dict) -> list[dict]:
    from compressed_tensors.quantization import QuantizationScheme

    groups = config["quantization_config"]["config_groups"].values()
    return [_layout(QuantizationScheme.model_validate(g)) for g in groups]


def _offered():
    """(method, settings, preset claimed, group size chosen) for every scheme each method offers."""
    from flipcheck.compressors.rtn import preset_schemes

    rows = [("gptq", {"scheme": s}, s, None) for s in ("W4A16", "W4A16_ASYM", "W8A16", "W8A8")]
    rows += [("gptq", {"scheme": "W4A16", "group_size": 64}, "W4A16", 64), ("awq", {}, "W4A16_ASYM", None)]
    rows += [("awq", {"group_size": 64}, "W4A16_ASYM", 64), ("smoothquant", {}, "W8A8", None)]
    rows += [("rtn", {"scheme": s}, s, None) for s in preset_schemes()]
    return rows + [("rtn", {"scheme": "W4A16", "group_size": 64}, "W4A16", 64)]


def test_every_offered_scheme_asks_for_its_preset():
    """The quantization modifiers each method builds carry exactly the preset's layout (the user's
    group size where the preset is group-wise); the saved configs are checked against the same
    presets in test_save_reload_identical_logits and below."""
    for method, settings, preset, group in _offered():
        modifiers = llmc.modifiers_for(method, make_config(method, settings))
        schemes = [g for m in modifiers for g in (getattr(m, "config_groups", None) or {}).values()]
        assert [_layout(s) for s in schemes] == [preset_layout(preset, group)], (method, settings)


@pytest.mark.parametrize(
    ("settings", "preset", "group"),
    [({"scheme": "W4A16", "group_size": 64}, "W4A16", 64), ({"scheme": "INT8"}, "INT8", None), ({"scheme": "NVFP4A16"}, "NVFP4A16", None)],
    ids=["W4A16-g64", "INT8", "NVFP4A16"],
)
def test_saved_quantization_config_is_the_preset(settings, preset, group, tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    get_method("rtn").apply(model, make_config("rtn", settings), None)
    folder = save_model(model, None, tmp_path / "child", {"method": "rtn"})
    assert saved_layouts(json.loads((folder / "config.json").read_text())) == [preset_layout(preset, group)]


@pytest.mark.parametrize(("method", "settings"), [("gptq", {"scheme": "W8A8", "group_size": 128}), ("rtn", {"scheme": "INT8", "group_size": 64})])
def test_group_wise_w8a8_is_refused(method, settings):
    with pytest.raises(FlipcheckError) as err:
        make_config(method, settings)
    message = str(err.value)
    assert "\n" not in message and f"group_size={settings['group_size']}" in message
    assert "allowed: group_size=None (per channel)" in message and "vLLM" in message
