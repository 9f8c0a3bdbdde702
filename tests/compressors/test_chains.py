"""Chains: pairs that cannot work are refused before any work, the others compress and reload."""

from __future__ import annotations

import pytest
import torch

from flipcheck.compressors.pipeline import compress
from flipcheck.compressors.registry import MODEL_KINDS, check_chain, methods
from flipcheck.errors import FlipcheckError
from flipcheck.models import load_model, read_provenance
from flipcheck.recipes.schema import parse_recipe

REFUSED = [
    (["slicegpt", "gptq"], "gptq cannot follow slicegpt"),
    (["slicegpt", "rtn"], "rtn cannot follow slicegpt"),
    (["slicegpt", "bnb"], "bnb cannot follow slicegpt"),
    (["slicegpt", "wanda"], "wanda cannot follow slicegpt"),
    (["slicegpt", "noise"], "noise cannot follow slicegpt"),
    (["bnb", "noise"], "noise cannot follow bnb"),
    (["gptq", "wanda"], "wanda cannot follow gptq"),
    (["wanda", "gptq", "layer_drop"], "layer_drop cannot follow gptq"),
    (["slicegpt", "slicegpt"], "slicegpt cannot follow slicegpt"),
]


@pytest.fixture(scope="module")
def cal_file(tmp_path_factory):
    from conftest import corpus

    path = tmp_path_factory.mktemp("chains") / "cal.txt"
    path.write_text("\n\n".join(corpus() * 3))
    return {"source": str(path), "samples": 4, "seq_len": 32}


def test_every_method_declares_known_kinds():
    for name, m in methods().items():
        assert m.accepts and set(m.accepts) <= set(MODEL_KINDS), name
        assert m.produces is None or m.produces in MODEL_KINDS, name
    assert check_chain(["wanda", "gptq"]) == ["sparse", "quantized"]
    assert check_chain(["wanda", "layer_drop", "noise"]) == ["sparse", "sparse", "dense"]


@pytest.mark.parametrize(("chain", "fragment"), REFUSED)
def test_impossible_pairs_are_named_with_the_allowed_successors(chain, fragment):
    with pytest.raises(FlipcheckError) as err:
        check_chain(chain)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    assert "allowed after" in msg


def test_allowed_successors_are_listed():
    with pytest.raises(FlipcheckError, match=r"noise cannot follow bnb .*allowed after bnb: nothing"):
        check_chain(["wanda", "bnb", "noise"])  # bnb may follow wanda; nothing may follow packed bnb weights
    with pytest.raises(FlipcheckError, match="allowed after slicegpt: nothing"):
        check_chain(["slicegpt", "gptq"])


def test_compress_refuses_before_loading_the_parent(tmp_path):
    # the parent does not exist: the chain error comes first, and nothing is written
    with pytest.raises(FlipcheckError, match="noise cannot follow bnb"):
        compress(tmp_path / "no-such-parent", [("bnb", {}), ("noise", {"sigma": 0.01})], out=tmp_path / "child")
    assert not (tmp_path / "child").exists()


def test_recipe_refuses_with_the_line(tmp_path):
    text = (
        "name: bad\nparent: demo\nchildren:\n  - name: s-then-q\n    steps:\n"
        "      - {method: slicegpt, settings: {slicing: 0.1}}\n      - {method: rtn}\n"
    )
    with pytest.raises(FlipcheckError, match=r"<recipe>:\d+: .*rtn cannot follow slicegpt"):
        parse_recipe(text)


def test_cli_exits_2_with_one_line(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app

    res = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "-m", "slicegpt", "-m", "gptq", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert "gptq cannot follow slicegpt" in res.output
    assert not (tmp_path / "c").exists()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_wanda_then_gptq_reloads(tiny_model_dir, tiny_tokenizer, cal_file, tmp_path):
    ids = tiny_tokenizer(["The cat saw a red ball and ran after it."], return_tensors="pt")["input_ids"]
    res = compress(
        tiny_model_dir, [("wanda", {"mask": "2:4"}), ("gptq", {"scheme": "W4A16"})], out=tmp_path / "c", calibration=cal_file
    )
    loaded = load_model(res.out, device="cpu")
    torch.testing.assert_close(_logits(loaded, ids), _logits(res.model, ids), atol=1e-4, rtol=1e-4)
    assert [r["method"] for r in read_provenance(res.out)["reports"]] == ["wanda", "gptq"]


def test_wanda_then_layer_drop_reloads(tiny_model_dir, tiny_tokenizer, cal_file, tmp_path):
    ids = tiny_tokenizer(["The cat saw a red ball and ran after it."], return_tensors="pt")["input_ids"]
    res = compress(tiny_model_dir, [("wanda", {"sparsity": 0.5}), ("layer_drop", {"n": 1})], out=tmp_path / "c", calibration=cal_file)
    loaded = load_model(res.out, device="cpu")
    assert loaded.config.num_hidden_layers == 1
    assert torch.equal(_logits(loaded, ids), _logits(res.model, ids))
    down = loaded.model.layers[0].mlp.down_proj.weight
    assert float((down == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # wanda's zeros survive


def test_compressed_children_are_freed(tiny_model, tiny_tokenizer, cal_file):
    """torch.fx keeps the code llm-compressor traces, with the model in its globals; the pipeline
    drops it, so a sweep does not keep every child in memory."""
    import copy
    import gc
    import weakref

    from flipcheck.compressors.calibration import CalibrationConfig
    from flipcheck.compressors.pipeline import compress_model, prepare_calibration, validate_steps

    steps = validate_steps([("wanda", {"sparsity": 0.5})])
    cal = prepare_calibration(tiny_tokenizer, steps, CalibrationConfig(**cal_file))
    refs = []
    for _ in range(2):
        child = copy.deepcopy(tiny_model)
        compress_model(child, tiny_tokenizer, steps, parent_source="p", calibration=cal, parent_fingerprint="p")
        refs.append(weakref.ref(child))
        del child
    gc.collect()
    assert refs[0]() is None and refs[1]() is None  # nor does llm-compressor's session keep the last one
