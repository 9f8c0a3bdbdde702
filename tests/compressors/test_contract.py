"""One contract, every method (as peft's TEST_CASES): the same checks run for each registered method.

For each row: the child's forward is finite; the report's stats match the tensors; the child
saves through the real pipeline (HF folder + flipcheck.json) and reloads with identical logits;
a bad setting is refused before any work; the identity setting, where the method has one,
reproduces the parent's logits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from flipcheck.compressors import get_method, make_config, methods
from flipcheck.compressors.calibration import Calibration, CalibrationConfig
from flipcheck.compressors.pipeline import compress_model, validate_steps
from flipcheck.compressors.stats import count_parameters, targeted_linears
from flipcheck.errors import FlipcheckError
from flipcheck.models import load_model

# method, settings, a bad setting (key -> value), identity settings or None, sparsity expected or None
CASES = [
    ("noise", {"sigma": 0.1}, {"sigma": -0.1}, {"sigma": 0.0}, None),
    ("rtn", {"scheme": "W4A16", "group_size": 128}, {"scheme": "W3A5"}, None, None),
    ("gptq", {"scheme": "W4A16", "group_size": 128}, {"scheme": "W3A16"}, None, None),
    ("awq", {"group_size": 128}, {"group_size": 0}, None, None),
    ("smoothquant", {"alpha": 0.5}, {"alpha": 1.5}, None, None),
    ("bnb", {"mode": "nf4"}, {"mode": "int3"}, None, None),
    ("wanda", {"sparsity": 0.5}, {"sparsity": 1.5}, {"sparsity": 0.0}, 0.5),
    ("sparsegpt", {"mask": "2:4"}, {"mask": "3:2"}, {"sparsity": 0.0}, 0.5),
    ("layer_drop", {"n": 1, "selection": "angular"}, {"selection": "middle"}, {"n": 0}, None),
    ("slicegpt", {"slicing": 0.25}, {"slicing": 1.0}, {"slicing": 0.0}, None),
    ("gguf", {"type": "Q4_K_M"}, {"type": "Q3_X"}, {"type": "F32"}, None),
]


def test_every_registered_method_is_in_the_contract_table():
    assert {c[0] for c in CASES} == set(methods())


@pytest.fixture(scope="module")
def calibration(tiny_tokenizer):
    from conftest import corpus

    ids = tiny_tokenizer("\n".join(corpus() * 3), return_tensors="pt").input_ids[0]
    n, length = 8, 32
    rows = torch.stack([ids[i * length : (i + 1) * length] for i in range(n)])
    return Calibration(tokenizer=tiny_tokenizer, input_ids=rows, config=CalibrationConfig(samples=n, seq_len=length))


@pytest.fixture(scope="module")
def probe(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("Question: What color is the horse?\nAnswer: The horse is blue.").input_ids])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(("name", "settings", "bad", "identity", "sparsity"), CASES, ids=[c[0] for c in CASES])
def test_method_contract(name, settings, bad, identity, sparsity, tiny_model, tiny_tokenizer, calibration, probe, tmp_path):
    parent_logits = _logits(tiny_model, probe)

    # bad settings: refused at validation, before a model is touched
    with pytest.raises(FlipcheckError, match=next(iter(bad))):
        make_config(name, {**settings, **bad})

    child = copy.deepcopy(tiny_model)
    res = compress_model(child, tiny_tokenizer, validate_steps([(name, settings)]), parent_source="parent",
                         out=tmp_path / "child", calibration=calibration)
    report = res.reports[0]
    child_logits = _logits(res.model, probe)
    assert torch.isfinite(child_logits).all()
    assert not torch.equal(child_logits, parent_logits)  # the method did something

    # stats measured on the tensors
    assert report.parameters > 0 and report.wall_time_s >= 0
    if sparsity is not None:
        weights = [m.weight for _, m in targeted_linears(res.model)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(sparsity, abs=0.01)
        assert report.sparsity == pytest.approx(zeros, abs=0.01)
    assert 0 < report.bits_per_weight <= 32

    # save -> reload -> identical logits
    reloaded = load_model(tmp_path / "child", device="cpu")
    torch.testing.assert_close(_logits(reloaded, probe), child_logits, atol=1e-5, rtol=1e-5)

    # identity setting reproduces the parent
    if identity is not None:
        same = copy.deepcopy(tiny_model)
        compress_model(same, tiny_tokenizer, validate_steps([(name, identity)]), parent_source="p", calibration=calibration)
        torch.testing.assert_close(_logits(same, probe), parent_logits, atol=1e-4, rtol=1e-4)


# settings that are valid in general but not for this model: refused before the model changes
MODEL_DEPENDENT = [
    ("gptq", {"scheme": "W4A16", "group_size": 96}, "96"),  # 128-wide layers: 96 does not divide them
    ("rtn", {"scheme": "W4A16", "group_size": 96}, "96"),
    ("layer_drop", {"n": 2}, "n=2"),  # the tiny model has 2 layers
]


@pytest.mark.parametrize(("name", "settings", "pattern"), MODEL_DEPENDENT, ids=[c[0] for c in MODEL_DEPENDENT])
def test_model_dependent_bad_settings_leave_the_model_untouched(name, settings, pattern, tiny_model, tiny_tokenizer, calibration):
    from flipcheck.models import fingerprint

    child = copy.deepcopy(tiny_model)
    before = fingerprint(child)
    with pytest.raises(FlipcheckError, match=pattern):
        compress_model(child, tiny_tokenizer, validate_steps([(name, settings)]), parent_source="p", calibration=calibration)
    assert fingerprint(child) == before


# ------------------------------------------------------------------------------------------------
# stats in chains: every step's figures are read off the model it leaves (compressors/stats.py)


def _chain(tiny_model, tiny_tokenizer, calibration, steps, out=None):
    child = copy.deepcopy(tiny_model)
    return compress_model(child, tiny_tokenizer, validate_steps(steps), parent_source="p", out=out, calibration=calibration)


def test_sparsity_survives_quantization_and_layer_dropping(tiny_model, tiny_tokenizer, calibration, probe, tmp_path):
    from flipcheck.compressors.bnb import cpu_kernel, dequantized_weight

    parent_parameters = count_parameters(tiny_model)
    res = _chain(tiny_model, tiny_tokenizer, calibration, [("wanda", {"sparsity": 0.5}), ("bnb", {"mode": "nf4"})],
                 out=tmp_path / "wb")
    wanda, bnb = res.reports
    zeros = [dequantized_weight(m) == 0 for _, m in targeted_linears(res.model)]
    assert bnb.sparsity == sum(int(z.sum()) for z in zeros) / sum(z.numel() for z in zeros)
    assert 0.5 <= bnb.sparsity < 0.6  # wanda's zeros stay zero; NF4 rounds a few small weights to 0 too
    # parameters are logical weights: not half of them for the packed 4-bit bytes
    assert bnb.parameters == wanda.parameters == parent_parameters
    written = json.loads((tmp_path / "wb" / "flipcheck.json").read_text())
    assert written["parameters"] == parent_parameters
    assert written["reports"][1]["extra"]["cpu_kernel"] == cpu_kernel(res.model) in ("avx512_bf16 repack", "reference")
    assert bnb.bits_per_weight == 4.5
    # the chain's child saves as a bitsandbytes checkpoint (not llm-compressor's format) and reloads
    reloaded = load_model(tmp_path / "wb", device="cpu")
    assert torch.equal(_logits(reloaded, probe), _logits(res.model, probe))

    res = _chain(tiny_model, tiny_tokenizer, calibration, [("wanda", {"sparsity": 0.5}), ("layer_drop", {"n": 1})])
    assert res.reports[1].sparsity == pytest.approx(0.5, abs=0.01)
    assert res.reports[1].parameters < parent_parameters


def test_steps_after_quantization_report_its_bits(tiny_model, tiny_tokenizer, calibration):
    """Measured on the tensors, not on the first Linear's dtype: a step after gptq still reports
    gptq's int4 storage (here layer dropping, applied directly: the function is what is tested)."""
    from flipcheck.compressors.stats import measure

    res = _chain(tiny_model, tiny_tokenizer, calibration, [("wanda", {"sparsity": 0.5}), ("gptq", {"scheme": "W4A16"})])
    gptq = res.reports[1]
    assert 4 < gptq.bits_per_weight < 4.5 and gptq.extra["quantized_linears"] == 14
    assert gptq.sparsity == measure(res.model).sparsity > 0.1
    dropped = get_method("layer_drop").apply(res.model, make_config("layer_drop", {"n": 1}), calibration)
    assert dropped.bits_per_weight == pytest.approx(gptq.bits_per_weight)
    assert dropped.extra["quantized_linears"] == 7


# ------------------------------------------------------------------------------------------------
# structure: one registry entry per method, no import cycle between models.py and compressors/


def test_llm_compressor_methods_carry_their_modifier_builder_on_the_registry_entry():
    from flipcheck.compressors import llmc

    engine = {n for n, m in methods().items() if m.modifiers is not None}
    assert engine == {"gptq", "awq", "smoothquant", "rtn", "wanda", "sparsegpt"}
    assert llmc.llmc_methods() == sorted(engine)
    for name in engine:  # one shared apply, built from the entry's builder
        assert methods()[name].apply.__qualname__.startswith("_oneshot_apply")
    assert not hasattr(llmc, "_BUILDERS") and not hasattr(llmc, "PruningConfig")
    with pytest.raises(ValueError, match="either apply or modifiers"):
        from flipcheck.compressors.registry import MethodConfig, register

        register("nothing", MethodConfig)


def test_models_does_not_import_the_compressors():
    import subprocess
    import sys

    code = (
        "import sys, flipcheck.models as m\n"
        "assert not any(k.startswith('flipcheck.compressors') for k in sys.modules), 'models imported compressors'\n"
        "from flipcheck.loaders import get_loader\n"
        "assert get_loader('bnb').__module__ == 'flipcheck.compressors.bnb' and get_loader('nope') is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
