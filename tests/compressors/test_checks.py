"""Cheap checks first: what config.json and the calibration source make impossible fails before any
model or data loads (compress, and every child of a recipe before the parent is scored)."""

from __future__ import annotations

import pytest
import transformers
import yaml
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.compressors.architectures import linear_widths
from flipcheck.compressors.calibration import DEFAULT_SOURCE
from flipcheck.compressors.calibration_data import check_reachable
from flipcheck.compressors.stats import targeted_linears
from flipcheck.errors import FlipcheckError
from flipcheck.orchestrate.recipe import run_recipe
from flipcheck.recipes.schema import parse_recipe
from flipcheck.tiny import build_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory, tiny_tokenizer):
    """A 64-wide tiny Llama (4 heads of 16, intermediate 128) as a folder: group 128 cannot apply."""
    out = tmp_path_factory.mktemp("narrow")
    build_llama(len(tiny_tokenizer), hidden_size=64, intermediate_size=128, seed=0).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any model's weights are loaded (a spy on transformers' loader)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("kw", [
    {},
    {"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 3, "model_type": "mistral"},
    {"model_type": "qwen2", "num_key_value_heads": 2},
])
def test_widths_from_config_are_the_model_s_linears(kw):
    model = build_llama(64, **kw)
    expected = [(name, mod.in_features) for name, mod in targeted_linears(model)]
    assert linear_widths(model.config.to_dict()) == expected


def test_widths_by_hand():
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
           "num_attention_heads": 2, "head_dim": 48}  # o_proj reads 2 heads x 48 = 96, not 64
    assert dict(linear_widths(cfg)) == {
        "model.layers.0.self_attn.q_proj": 64, "model.layers.0.self_attn.k_proj": 64,
        "model.layers.0.self_attn.v_proj": 64, "model.layers.0.self_attn.o_proj": 96,
        "model.layers.0.mlp.gate_proj": 64, "model.layers.0.mlp.up_proj": 64, "model.layers.0.mlp.down_proj": 96}
    assert linear_widths({**cfg, "model_type": "gpt2"}) is None  # unknown layout: nothing said before loading
    assert linear_widths({"model_type": "llama"}) is None


def test_compress_names_the_group_size_before_the_unreachable_calibration(narrow_dir, tmp_path, monkeypatch,
                                                                          no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "child"
    res = runner.invoke(app, ["compress", str(narrow_dir), "--method", "gptq", "--set", "group_size=128",
                              "--out", str(out)])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "group_size=128" in lines[0] and "in_features=64" in lines[0] and "(32, 64)" in lines[0]
    assert "calibration" not in lines[0] and not out.exists()

    # with a group size that fits, the next cheap check speaks: the default calibration set, offline
    res = runner.invoke(app, ["compress", str(narrow_dir), "--method", "gptq", "--set", "group_size=64",
                              "--out", str(out)])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert DEFAULT_SOURCE in lines[0] and "offline" in lines[0] and "--calibration PATH" in lines[0]
    assert not out.exists()


def test_n_m_mask_against_config_widths(narrow_dir, tmp_path, no_loading):
    res = runner.invoke(app, ["compress", str(narrow_dir), "--method", "wanda", "--set", "mask=2:128",
                              "--out", str(tmp_path / "c"), "--calibration", "demo"])
    assert res.exit_code == 2 and "M=128" in res.output and "in_features=64" in res.output, res.output


def test_calibration_sources_checked_without_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlipcheckError, match="offline mode is on.*pass a local .txt or .jsonl file"):
        check_reachable(DEFAULT_SOURCE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlipcheckError, match="holds no .txt or .jsonl"):
        check_reachable(str(tmp_path / "empty"))
    with pytest.raises(FlipcheckError, match="neither an existing"):
        check_reachable(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(FlipcheckError, match="unsupported type '.csv'"):
        check_reachable(str(tmp_path / "data.csv"))
    with pytest.raises(FlipcheckError, match="expected hf:NAME"):
        check_reachable("hf:")
    (tmp_path / "text.jsonl").write_text('{"text": "a b c"}\n')
    for ok in (str(tmp_path / "text.jsonl"), str(tmp_path), f"hf:{tmp_path}", "demo"):
        check_reachable(ok)  # a local dataset folder needs no network


def recipe(parent, task_dir, children, calibration=None):
    body = {"name": "checks", "parent": str(parent), "children": children, "device": "cpu",
            "evaluation": {"tasks": ["tiny_letters"], "include_path": str(task_dir), "batch_size": 8}}
    if calibration:
        body["calibration"] = {"source": calibration}
    return parse_recipe(yaml.safe_dump(body))


@pytest.mark.parametrize("second, calibration, message", [
    ({"method": "gptq", "settings": {"group_size": 128}}, "demo", "child bad: gptq group_size=128"),
    ({"method": "gptq", "settings": {"group_size": 64}}, None, f"calibration source '{DEFAULT_SOURCE}'"),
])
def test_recipe_checks_every_child_before_the_parent_is_scored(narrow_dir, task_dir, tmp_path, monkeypatch, no_loading,
                                                               second, calibration, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = recipe(narrow_dir, task_dir, [{"name": "fine", "steps": [{"method": "noise", "settings": {"sigma": 0.01}}]},
                                      {"name": "bad", "steps": [second]}], calibration)
    cache, out = tmp_path / "fc", tmp_path / "run"
    with pytest.raises(FlipcheckError) as err:
        run_recipe(r, out, cache_dir=cache)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (cache / "results").exists()  # no cache entry: the parent was not scored
    assert not (out / "children").exists() and not (out / "report.json").exists()
