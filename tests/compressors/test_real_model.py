"""Every method on a real pretrained model: SmolLM2-135M-Instruct (hidden 576, vocabulary 49,152,
tied embeddings), from the cached folder of the ``smollm2_dir`` fixture.

Each child is compressed through the real pipeline, saved, and reloaded by flipcheck's loader (plain
transformers for all but SliceGPT's children); its logits are finite and the reload gives the same
logits. Kept short: 4 calibration samples of 64 tokens, one prompt, and the methods run on the
model's first 6 of its 30 layers (real weights and shapes; flipcheck's layer_drop cuts the rest):
on all 30, GPTQ's column-by-column loop and the saves take minutes on a 2-core CPU
(benchmarks/compress_speed.py times gptq and wanda on the whole model); GPTQ itself runs on the
first 2 layers. The group-size refusal is checked on the whole model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import build_calibration
from flipcheck.compressors.pipeline import compress_model, validate_steps
from flipcheck.errors import FlipcheckError
from flipcheck.models import load_model, load_tokenizer

TEXT = [
    "The river runs past the old mill and under the stone bridge before it reaches the sea.",
    "In spring the farmers plant wheat and barley; in autumn they bring the harvest into the barns.",
    "A computer program is a list of instructions that a machine follows one step at a time.",
    "She opened the window, listened to the rain for a while, and then went back to her book.",
    "Water boils at one hundred degrees Celsius at sea level, and at a lower temperature on a mountain.",
    "The museum keeps paintings, maps and letters from the years when the town was founded.",
] * 4

# method, settings, tolerance of the reload (0: bit-identical)
METHODS = [
    ("rtn", {"scheme": "W4A16", "group_size": 64}, 0.0),
    ("gptq", {"scheme": "W4A16", "group_size": 64}, 0.0),  # after dropping to GPTQ_LAYERS layers
    ("wanda", {"sparsity": 0.5}, 0.0),
    ("layer_drop", {"n": 2}, 0.0),
    ("slicegpt", {"slicing": 0.1}, 1e-4),  # rebuilt from its shortcut matrices
    ("noise", {"sigma": 0.05}, 0.0),
    ("bnb", {"mode": "nf4"}, 0.0),
]


KEEP_LAYERS = 6
GPTQ_LAYERS = 2  # GPTQ's column loop costs seconds per layer on a CPU


@pytest.fixture(scope="module")
def real(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, device="cpu", dtype="float32")
    calibration = build_calibration(tokenizer, CalibrationConfig(samples=4, seq_len=64, seed=0), texts=TEXT)
    prompt = tokenizer("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
    return model, tokenizer, calibration, prompt


@pytest.fixture(scope="module")
def first_layers(real):
    """The real model cut to its first KEEP_LAYERS layers (the parent of the method tests)."""
    model, tokenizer, calibration, prompt = real
    cut = copy.deepcopy(model)
    n = cut.config.num_hidden_layers - KEEP_LAYERS
    compress_model(cut, tokenizer, validate_steps([("layer_drop", {"n": n})]), parent_source="smollm2",
                   parent_fingerprint="smollm2", calibration=calibration)
    assert cut.config.num_hidden_layers == KEEP_LAYERS
    return cut, tokenizer, calibration, prompt


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.float()


@pytest.mark.parametrize(("name", "settings", "tol"), METHODS, ids=[m[0] for m in METHODS])
def test_method_on_the_real_model(name, settings, tol, first_layers, tmp_path):
    parent, tokenizer, calibration, prompt = first_layers
    child = copy.deepcopy(parent)
    steps = [(name, settings)]
    if name == "gptq":
        steps.insert(0, ("layer_drop", {"n": KEEP_LAYERS - GPTQ_LAYERS}))
    res = compress_model(child, tokenizer, validate_steps(steps), parent_source="smollm2",
                         parent_fingerprint="smollm2-cut", out=tmp_path / "child", calibration=calibration)
    out = _logits(res.model, prompt)
    assert torch.isfinite(out).all()
    assert res.reports[-1].parameters > 0
    reloaded = _logits(load_model(tmp_path / "child", device="cpu"), prompt)
    if tol:
        torch.testing.assert_close(reloaded, out, rtol=tol, atol=tol)
    else:
        assert torch.equal(reloaded, out)


@pytest.mark.parametrize("name", ["gptq", "rtn"])
def test_group_128_is_refused_on_hidden_576(name, real):
    parent, tokenizer, calibration, _ = real
    with pytest.raises(FlipcheckError) as err:
        compress_model(parent, tokenizer, validate_steps([(name, {"scheme": "W4A16", "group_size": 128})]),
                       parent_source="smollm2", calibration=calibration)
    message = str(err.value)
    assert "\n" not in message and "in_features=576" in message and "64" in message
