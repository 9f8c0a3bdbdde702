"""bitsandbytes method: real bitsandbytes kernels on CPU, on the tiny Llama of conftest.

What is checked against what:
- the child's quantized tensors equal bitsandbytes.functional's own quantization of the parent's
  weights (bytes and dequantized values, exactly);
- 4-bit logits equal the parent run with the dequantized weights (dequantize -> matmul in float32);
- an int8 layer equals LLM.int8()'s formula computed by hand (row absmax int8 + outlier columns);
- save -> plain AutoModelForCausalLM.from_pretrained -> identical logits, before or after a forward;
- the child runs the kernel path plain transformers takes on the machine the tests run on (the
  AVX512-BF16 repacking path or the reference path) and says which; a repacked layer still saves
  and measures exactly;
- the reported bits / parameters / sparsity equal what the saved tensors hold.
"""

from __future__ import annotations

import copy
import json

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from transformers import AutoModelForCausalLM

from flipcheck.compressors import make_config
from flipcheck.compressors.bnb import (
    BnbConfig,
    apply_bnb,
    cpu_kernel,
    dequantized_weight,
    load_bnb_child,
    pin_reference_kernels,
)
from flipcheck.compressors.stats import count_parameters, measure, targeted_linears
from flipcheck.errors import FlipcheckError
from flipcheck.models import fingerprint, load_model, save_model

# the path plain transformers takes for 4-bit layers on the CPU these tests run on
MACHINE_KERNEL = "avx512_bf16 repack" if F.has_avx512bf16() else "reference"

CASES = [
    pytest.param({"mode": "int8"}, id="int8"),
    pytest.param({"mode": "nf4"}, id="nf4"),
    pytest.param({"mode": "fp4"}, id="fp4"),
    pytest.param({"mode": "nf4", "double_quant": True}, id="nf4-dq"),
    pytest.param({"mode": "fp4", "double_quant": True}, id="fp4-dq"),
]


@pytest.fixture(scope="module")
def ids(tiny_tokenizer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, len(tiny_tokenizer), (3, 24), generator=gen)


@pytest.fixture(scope="module")
def parent_logits(tiny_model, ids) -> torch.Tensor:
    with torch.no_grad():
        return tiny_model(ids).logits


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def quantized(tiny_model, **settings):
    child = copy.deepcopy(tiny_model)
    report = apply_bnb(child, BnbConfig(**settings))
    return child, report


def provenance(report) -> dict:
    return {"method": "bnb", "config": report.config, **report.extra["provenance"]}


# ------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"mode": "int3"}, ["mode", "'int8'", "'nf4'", "'fp4'"]),
        ({"mode": "int8", "double_quant": True}, ["double_quant", "nf4", "fp4"]),
        ({"mode": "int8", "threshold": -1}, ["threshold", "greater than or equal to 0"]),
        ({"mode": "nf4", "threshold": 3.0}, ["threshold", "int8"]),
        ({"mode": "int8", "compute_dtype": "bfloat16"}, ["compute_dtype", "nf4"]),
        ({"mode": "nf4", "compute_dtype": "float64"}, ["compute_dtype", "'float32'", "'bfloat16'"]),
        ({"mode": "nf4", "blocksize": 32}, ["unknown setting 'blocksize'"]),
    ],
)
def test_bad_settings_are_rejected_with_the_allowed_values(settings, words):
    with pytest.raises(FlipcheckError) as err:
        make_config("bnb", settings)
    for w in words:
        assert w in str(err.value)


def test_settings_from_the_command_line_are_coerced():
    cfg = make_config("bnb", {"mode": "nf4", "double_quant": "true", "compute_dtype": "bfloat16"})
    assert cfg == BnbConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16")
    assert make_config("bnb", {"threshold": "0"}).threshold == 0.0


def test_model_problems_fail_before_any_module_is_replaced(tiny_model):
    child = copy.deepcopy(tiny_model)
    before = fingerprint(child)
    with pytest.raises(FlipcheckError, match="no decoder nn.Linear"):
        apply_bnb(child, BnbConfig(mode="nf4", skip_modules=["*"]))
    assert fingerprint(child) == before and child.config.to_dict().get("quantization_config") is None

    apply_bnb(child, BnbConfig(mode="nf4"))
    quantized_print = fingerprint(child)
    with pytest.raises(FlipcheckError, match="already quantized"):
        apply_bnb(child, BnbConfig(mode="int8"))
    assert fingerprint(child) == quantized_print


# ------------------------------------------------------------------------------------------
# the quantized tensors are bitsandbytes' own


@pytest.mark.parametrize("settings", CASES)
def test_tensors_equal_bitsandbytes_functional_quantization(tiny_model, settings):
    child, report = quantized(tiny_model, **settings)
    parents = dict(targeted_linears(tiny_model))
    assert report.targeted == len(parents) == 14
    for name, parent in parents.items():
        mod = child.get_submodule(name)
        w = parent.weight.detach()
        if settings["mode"] == "int8":
            assert isinstance(mod, bnb.nn.Linear8bitLt)
            cb, scb, _ = F.int8_vectorwise_quant(w.half())
            assert torch.equal(mod.weight.data, cb) and torch.equal(mod.weight.SCB, scb)
            expected = F.int8_vectorwise_dequant(cb, scb)
        else:
            assert isinstance(mod, bnb.nn.Linear4bit)
            packed, qs = F.quantize_4bit(
                w,
                blocksize=64,
                compress_statistics=settings.get("double_quant", False),
                quant_type=settings["mode"],
            )
            assert torch.equal(mod.weight.data, packed)
            assert (
                mod.weight.quant_state.quant_type == settings["mode"]
                and mod.weight.quant_state.blocksize == 64
            )
            expected = F.dequantize_4bit(packed, qs)
        assert torch.equal(dequantized_weight(mod), expected)
        assert torch.equal(mod.bias, parent.bias) if parent.bias is not None else mod.bias is None
    # the output head and everything that is not a decoder Linear are untouched
    assert type(child.lm_head) is torch.nn.Linear and torch.equal(
        child.lm_head.weight, tiny_model.lm_head.weight
    )
    assert torch.equal(child.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_4bit_logits_are_the_parent_run_with_dequantized_weights(tiny_model, ids, mode):
    child, _ = quantized(tiny_model, mode=mode, double_quant=True)
    reference = copy.deepcopy(tiny_model)
    for name, lin in targeted_linears(reference):
        lin.weight.data.copy_(dequantized_weight(child.get_submodule(name)))
    expected = logits(reference, ids)
    on_this_machine = logits(child, ids)
    assert pin_reference_kernels(child) == (14 if MACHINE_KERNEL != "reference" else 0)
    torch.testing.assert_close(logits(child, ids), expected, rtol=1e-5, atol=1e-5)
    if MACHINE_KERNEL == "reference":
        assert on_this_machine.equal(logits(child, ids))
    else:  # bfloat16 absmaxes and matmul: close to the reference, not equal
        assert not on_this_machine.equal(expected)
        torch.testing.assert_close(on_this_machine, expected, rtol=0.0, atol=0.05)


def llm_int8_by_hand(
    x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias, threshold: float
) -> torch.Tensor:
    """LLM.int8(): outlier columns (any |x| >= threshold) in full precision times the dequantized
    weight columns; the rest as int8 row-absmax of the (float16) activations times int8 weights."""
    x16 = x.half().float()
    outlier = (x16.abs() >= threshold).any(dim=0)
    regular = x16.masked_fill(x16.abs() >= threshold, 0.0)
    sx = regular.abs().amax(dim=1)
    cx = torch.round(regular * (127.0 / sx[:, None]))
    cx[:, outlier] = 0
    y = (cx @ cb.float().t()) * (sx[:, None] * scb[None, :]) / 127.0**2
    w_hat = cb.float() * scb[:, None] / 127.0
    y = y + x[:, outlier] @ w_hat[:, outlier].t()
    return y if bias is None else y + bias


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_layer_follows_the_llm_int8_formula(tiny_model, threshold):
    child, _ = quantized(tiny_model, mode="int8", threshold=threshold)
    mod = child.model.layers[0].mlp.down_proj
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, mod.in_features, generator=gen)
    x[1, 7], x[3, 100], x[0, 7] = 9.0, -12.0, 6.5  # outlier columns 7 and 100
    cb, scb = mod.weight.data.clone(), mod.weight.SCB.clone()
    with torch.no_grad():
        y = mod(x)
    expected = llm_int8_by_hand(x, cb, scb, mod.bias, threshold if threshold > 0 else float("inf"))
    # bitsandbytes rescales by the constant 6.200124e-05 (~1/127^2 to 2e-5 relative)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    # the outliers matter: without them in full precision the result is measurably worse
    if threshold > 0:
        no_split = llm_int8_by_hand(x, cb, scb, mod.bias, float("inf"))
        assert (no_split - y).abs().max() > 10 * (expected - y).abs().max()


def test_logit_error_is_small_and_ordered_int8_nf4_fp4(tiny_model, ids, parent_logits):
    """On the tiny model's normally distributed weights NF4 (normal quantiles) beats FP4, and int8
    beats both; every child stays close to the parent."""
    rms = parent_logits.pow(2).mean().sqrt().item()
    bound = {"int8": 0.05, "nf4": 0.3, "fp4": 0.3}  # relative RMS logit error (measured: 0.014, 0.15, 0.21)
    errors, weight_errors = {}, {}
    for mode in ("int8", "nf4", "fp4"):
        child, _ = quantized(tiny_model, mode=mode)
        out = logits(child, ids)
        assert torch.isfinite(out).all()
        errors[mode] = (out - parent_logits).pow(2).mean().sqrt().item()
        weight_errors[mode] = sum(
            (dequantized_weight(child.get_submodule(n)) - lin.weight).pow(2).sum().item()
            for n, lin in targeted_linears(tiny_model)
        )
        assert errors[mode] < bound[mode] * rms
    assert errors["int8"] < errors["nf4"] < errors["fp4"]
    assert weight_errors["int8"] < weight_errors["nf4"] < weight_errors["fp4"]


# ------------------------------------------------------------------------------------------
# stats


@pytest.mark.parametrize("settings", CASES)
def test_report_matches_the_saved_tensors(tiny_model, tmp_path, settings):
    child, report = quantized(tiny_model, **settings)
    out = save_model(child, None, tmp_path / "child", provenance(report))
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    names = [n for n, _ in targeted_linears(tiny_model)]
    bits = sum(
        tensors[k].numel() * tensors[k].element_size() * 8
        for n in names
        for k in (f"{n}.weight", f"{n}.weight.absmax", f"{n}.weight.nested_absmax", f"{n}.SCB")
        if k in tensors
    )
    n_weights = sum(lin.weight.numel() for _, lin in targeted_linears(tiny_model))
    assert report.bits_per_weight == pytest.approx(bits / n_weights, rel=1e-12)
    if settings["mode"] == "int8":
        by_formula = sum(
            lin.weight.numel() * (8 + 32 / lin.in_features) for _, lin in targeted_linears(tiny_model)
        )
        assert report.bits_per_weight == pytest.approx(by_formula / n_weights, rel=1e-12)
    elif settings.get("double_quant"):
        assert report.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-12)
    else:
        assert report.bits_per_weight == 4.5
    assert report.extra["quantized_weight_bytes"] == bits // 8
    assert report.parameters == count_parameters(tiny_model)  # logical weights, not packed bytes
    zeros = sum(int((dequantized_weight(child.get_submodule(n)) == 0).sum()) for n in names)
    assert report.sparsity == zeros / n_weights and report.method == "bnb"
    assert report.extra["cpu_kernel"] == (MACHINE_KERNEL if settings["mode"] != "int8" else None)
    assert report.extra["mode"] == settings["mode"]
    assert report.extra["full_precision_linears"] == ["lm_head"]
    prov = json.loads((out / "flipcheck.json").read_text())
    assert prov["bytes_on_disk"] == (out / "model.safetensors").stat().st_size


# ------------------------------------------------------------------------------------------
# save / reload


@pytest.mark.parametrize("settings", CASES)
def test_save_and_plain_reload_give_identical_logits(tiny_model, tiny_tokenizer, tmp_path, ids, settings):
    child, report = quantized(tiny_model, **settings)
    out = save_model(child, tiny_tokenizer, tmp_path / "before_forward", provenance(report))
    expected = logits(child, ids)
    # save again after the forward: the forward must not have changed what is saved
    out2 = save_model(child, tiny_tokenizer, tmp_path / "after_forward", provenance(report))
    assert logits(child, ids).equal(expected)

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes"
    assert qcfg["load_in_8bit"] == (settings["mode"] == "int8")
    for folder in (out, out2):
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        cls = bnb.nn.Linear8bitLt if settings["mode"] == "int8" else bnb.nn.Linear4bit
        assert sum(isinstance(m, cls) for m in reloaded.modules()) == 14
        assert type(reloaded.lm_head) is torch.nn.Linear
        assert logits(reloaded, ids).equal(expected)
    # flipcheck's own loader (flipcheck.json: "loader": "bnb") gives the same model
    assert logits(load_model(out2, device="cpu"), ids).equal(expected)
    assert fingerprint(AutoModelForCausalLM.from_pretrained(out)) == fingerprint(child)


def test_skip_modules_stay_full_precision_through_save_and_reload(tiny_model, tmp_path, ids):
    child, report = quantized(
        tiny_model, mode="nf4", skip_modules=["*down_proj", "model.layers.1.self_attn.*"]
    )
    kept = {n for n, m in child.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} | {
        f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"
    }
    assert report.targeted == 14 - 6 and sorted(report.extra["full_precision_linears"]) == sorted(kept)
    assert torch.equal(
        child.model.layers[0].mlp.down_proj.weight, tiny_model.model.layers[0].mlp.down_proj.weight
    )
    out = save_model(child, None, tmp_path / "child", provenance(report))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert {n for n, m in reloaded.named_modules() if type(m) is torch.nn.Linear} == kept
    assert logits(reloaded, ids).equal(logits(child, ids))


def test_compute_dtype_is_used_and_saved(tiny_model, tmp_path, ids, parent_logits):
    child, report = quantized(tiny_model, mode="nf4", compute_dtype="bfloat16")
    assert report.extra["compute_dtype"] == "bfloat16"
    assert all(m.compute_dtype == torch.bfloat16 for m in child.modules() if isinstance(m, bnb.nn.Linear4bit))
    out = logits(child, ids)
    assert out.dtype == torch.float32
    folder = save_model(child, None, tmp_path / "child", provenance(report))
    assert (
        json.loads((folder / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"]
        == "bfloat16"
    )
    assert logits(AutoModelForCausalLM.from_pretrained(folder), ids).equal(out)
    # on the reference path the matmul really runs in bfloat16 (the AVX512-BF16 path always does)
    f32, _ = quantized(tiny_model, mode="nf4")
    pin_reference_kernels(child)
    pin_reference_kernels(f32)
    assert not logits(child, ids).equal(logits(f32, ids))


def test_child_runs_the_kernel_path_plain_transformers_takes_here(tiny_model, tiny_tokenizer, tmp_path, ids):
    """flipcheck's child (built or loaded) and a plain reload pick the same 4-bit CPU path on this
    machine, and the report and flipcheck.json say which one was measured."""
    child, report = quantized(tiny_model, mode="nf4")
    assert report.extra["cpu_kernel"] == cpu_kernel(child) == MACHINE_KERNEL
    layers = [m for m in child.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.support_avx512bf16_for_cpu == (MACHINE_KERNEL != "reference") for m in layers)
    out = save_model(child, tiny_tokenizer, tmp_path / "child", provenance(report))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert cpu_kernel(plain) == MACHINE_KERNEL and cpu_kernel(load_model(out, device="cpu")) == MACHINE_KERNEL
    assert logits(plain, ids).equal(logits(child, ids))
    pinned = load_bnb_child(out, {}, torch.device("cpu"), torch.float32)
    pin_reference_kernels(pinned)
    assert cpu_kernel(pinned) == "reference"


def test_repacked_layers_save_and_measure_exactly(tiny_model, tmp_path, ids, monkeypatch):
    """bitsandbytes' AVX512-BF16 repacking (simulated where the CPU lacks it: the repacking itself is
    plain torch) is undone exactly for a save, a fingerprint or a measurement; its own inverse is not."""
    fast = F.has_avx512bf16()
    if not fast:  # build the layers as on such a CPU (no forward runs on them below)
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    child, report = quantized(tiny_model, mode="nf4", double_quant=True)
    layers = [m for m in child.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [(m.weight.data.clone(), dequantized_weight(m)) for m in layers]
    first = save_model(child, None, tmp_path / "before", provenance(report))
    if fast:
        logits(child, ids)  # bitsandbytes repacks here
    else:
        for m in layers:
            m.weight.data, m.weight.quant_state = F._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
            m.quant_state = m.weight.quant_state
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    lossy = F._convert_weight_packed_for_cpu_inverse(layers[0].weight.data, copy.copy(layers[0].weight.quant_state))
    assert not torch.equal(F.dequantize_4bit(*lossy), before[0][1])  # why flipcheck keeps the state
    second = save_model(child, None, tmp_path / "after", provenance(report))
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert all(torch.equal(m.weight.data, w) and torch.equal(dequantized_weight(m), d) for m, (w, d) in zip(layers, before, strict=True))
    if fast:
        logits(child, ids)
    again = measure(child)  # stats read off a repacked model equal those read before any forward
    assert (again.parameters, again.bits_per_weight, again.sparsity) == (
        report.parameters, report.bits_per_weight, report.sparsity
    )
