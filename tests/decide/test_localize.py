"""localize: planted damage in one layer of the real SmolLM2 is found on every figure; the error math
against hand computations; layer-dropped and sliced children refused in one line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from flipcheck.compressors.registry import get_method, make_config
from flipcheck.decide.localize import check_one_to_one, error_figures, error_sums, localize_models, ranking
from flipcheck.errors import FlipcheckError

FIGURES = ("kl_swap_in", "kl_removed", "own_rel_error", "own_cosine", "own_sqnr_db", "stream_added")
TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Water boils at one hundred degrees Celsius at sea level and freezes at zero."] * 8


def noisy_child(parent, layer: int, sigma: float):
    child = copy.deepcopy(parent)
    get_method("noise").apply(child, make_config("noise", {"sigma": sigma, "include": [f"model.layers.{layer}.*"]}), None)
    return child


def test_error_figures_match_hand_computation():
    p = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    c = torch.tensor([[3.0, 5.0], [0.0, 1.0]])
    f = error_figures(error_sums(p, c))
    # ‖p‖² = 25, ‖c − p‖² = 2, ⟨c, p⟩ = 29, ‖c‖² = 35
    assert f["rel_error"] == pytest.approx(math.sqrt(2 / 25))
    assert f["cosine"] == pytest.approx(29 / math.sqrt(25 * 35))
    assert f["sqnr_db"] == pytest.approx(10 * math.log10(25 / 2))
    same = error_figures(error_sums(p, p))
    assert same == {"rel_error": 0.0, "cosine": 1.0, "sqnr_db": None}
    # sums accumulate over batches: two halves give the figures of the whole
    halves = error_sums(p[:1], c[:1]) + error_sums(p[1:], c[1:])
    assert error_figures(halves) == pytest.approx(f)


def test_replay_from_a_layer_equals_a_full_forward_with_that_layer_swapped(tiny_model):
    from flipcheck.decide.localize import _hooks, _recorder, _replay

    model = copy.deepcopy(tiny_model)
    donor = noisy_child(tiny_model, 1, 0.5).model.layers[1]
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    calls: list = [None, None]
    handles = [layer.register_forward_pre_hook(_recorder(calls, i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with _hooks(handles), torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(_replay(model, calls, 0, model.model.layers[0]), full, atol=1e-5)
    swapped = _replay(model, calls, 1, donor)
    handle = model.model.layers[1].register_forward_hook(lambda m, a, k, o: donor(*a, **k), with_kwargs=True)
    with _hooks([handle]), torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(expected, full, atol=1e-3)  # the swap changes the output ...
    assert torch.allclose(swapped, expected, atol=1e-5)  # ... and the replay reproduces it


def test_planted_noise_in_one_real_layer_is_found_on_every_figure(smollm2_dir):
    from flipcheck.compressors.calibration import CalibrationConfig
    from flipcheck.compressors.calibration_data import build_calibration
    from flipcheck.models import load_model, load_tokenizer

    parent = load_model(smollm2_dir, device="cpu", dtype="float32")
    ids = build_calibration(load_tokenizer(smollm2_dir), CalibrationConfig(samples=1, seq_len=16), texts=TEXT).input_ids
    planted = 7
    block = localize_models(parent, noisy_child(parent, planted, 0.5), ids, batch_size=1)
    assert len(block["layers"]) == 30 and block["positions"] == 16 and block["kl_total"] > 0.05
    for figure in FIGURES:
        assert ranking(block, figure)[0] == planted, figure
    assert block["modules"][0]["layer"] == planted
    assert {m["layer"] for m in block["modules"] if m["rel_error"] > 0} == {planted}
    row = block["layers"][planted]
    # the other layers are the parent's: the planted layer alone carries the child's whole text KL
    assert row["share_swap_in"] > 0.99 and row["share_removed"] > 0.99
    assert row["kl_swap_in"] == pytest.approx(block["kl_total"], rel=1e-4) and row["kl_restored"] < 1e-6
    others = [r for r in block["layers"] if r["layer"] != planted]
    assert all(r["kl_swap_in"] < 1e-6 and r["own"]["rel_error"] == 0.0 for r in others)
    assert all(r["stream"]["rel_error"] == 0.0 for r in others if r["layer"] < planted)


def test_layer_dropped_and_narrower_children_are_refused(tiny_model):
    from flipcheck.compressors.layer_drop import drop_layers
    from flipcheck.tiny import build_llama

    dropped = copy.deepcopy(tiny_model)
    drop_layers(dropped, [1])
    with pytest.raises(FlipcheckError, match=r"^localize: the child has 1 decoder layers, the parent 2 .*one-to-one") as err:
        check_one_to_one(tiny_model, dropped)
    assert "\n" not in str(err.value)
    wide = build_llama(tiny_model.config.vocab_size, hidden_size=256, seed=1)
    with pytest.raises(FlipcheckError, match="hidden size is 256, the parent's 128"):
        check_one_to_one(tiny_model, wide)
    sliced = copy.deepcopy(tiny_model)
    sliced.config.slicegpt = {"slicing": 0.25}
    with pytest.raises(FlipcheckError, match="SliceGPT child"):
        check_one_to_one(tiny_model, sliced)


def test_localize_command_writes_the_run_folder_and_refuses_dropped_children(tiny_model, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app
    from flipcheck.compressors.layer_drop import drop_layers

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"The cat saw a {c} ball and ran after it slowly." for c in ("red", "blue", "green") * 20))
    from flipcheck.models import save_model

    # a saved compressed-tensors child (packed int4 weights): layer 0 left unquantized, layer 1 W4A16
    quantized = copy.deepcopy(tiny_model)
    get_method("rtn").apply(quantized, make_config("rtn", {"scheme": "W4A16", "layers": "0:none"}), None)
    child_dir = save_model(quantized, None, tmp_path / "child", {"method": "rtn"})
    runner = CliRunner()
    res = runner.invoke(app, ["localize", str(tiny_model_dir), str(child_dir), "--text", str(text), "--windows", "2",
                              "--ctx", "16", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "Layers by damage" in res.output
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["schema"] == "flipcheck.localize" and [r["layer"] for r in data["localize"]["layers"]] == [0, 1]
    layers = data["localize"]["layers"]
    assert layers[0]["own"]["sqnr_db"] is None and layers[0]["kl_swap_in"] == 0.0  # the unquantized layer
    assert layers[1]["own"]["rel_error"] > 0 and layers[1]["share_swap_in"] == 1.0
    assert {m["layer"] for m in data["localize"]["modules"] if m["rel_error"] > 0} == {1}
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Where the damage is (localize)" in md and (tmp_path / "run" / "localize.png").stat().st_size > 0
    dropped = copy.deepcopy(tiny_model)
    drop_layers(dropped, [0])
    dropped.save_pretrained(tmp_path / "dropped")
    res = runner.invoke(app, ["localize", str(tiny_model_dir), str(tmp_path / "dropped"), "--text", str(text),
                              "--windows", "2", "--ctx", "16", "--device", "cpu"])
    assert res.exit_code == 2 and "layer-dropped" in res.output and "one-to-one" in res.output
