"""models.py: loading, fingerprints, provenance, and the errors users see first."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.models import (
    PROVENANCE_FILE,
    fingerprint,
    load_model,
    load_tokenizer,
    read_provenance,
    resolve_dtype,
    resolve_source,
    save_model,
    write_json_atomic,
)


def test_fingerprint_stable_across_save_reload_and_sensitive_to_one_weight(tiny_model, tiny_tokenizer, tmp_path):
    fp = fingerprint(tiny_model)
    out = save_model(tiny_model, tiny_tokenizer, tmp_path / "child", {"parent": None})
    reloaded = load_model(out, device="cpu")
    assert fingerprint(reloaded) == fp
    with torch.no_grad():
        reloaded.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert fingerprint(reloaded) != fp


def test_folder_fingerprint_is_bound_to_its_weight_files(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPCHECK_CACHE", str(tmp_path / "fc"))
    out = save_model(tiny_model, tiny_tokenizer, tmp_path / "child", {"parent": None})
    prov = read_provenance(out)
    assert set(prov["weights"]) == {"model.safetensors"} and len(prov["weights"]["model.safetensors"]["sha256"]) == 64
    fp = resolve_source(out).fingerprint
    assert fp == prov["fingerprint"]
    resaved = save_model(tiny_model, tiny_tokenizer, tmp_path / "again", {"parent": None})
    assert resolve_source(resaved).fingerprint == fp  # same weights, another folder and mtime: same identity
    twin = tmp_path / "copy"
    shutil.copytree(out, twin)
    (twin / "model.safetensors").touch()  # new mtime, same bytes: the content check keeps the fingerprint
    assert resolve_source(twin).fingerprint == fp
    # changed weights under the old flipcheck.json (same size, same names): a new fingerprint
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    changed.save_pretrained(twin)
    assert read_provenance(twin)["fingerprint"] == fp  # flipcheck.json still claims the old one
    assert resolve_source(twin).fingerprint != fp


def test_truncated_safetensors_is_one_line_naming_the_file(tiny_model, tiny_tokenizer, tmp_path):
    out = save_model(tiny_model, tiny_tokenizer, tmp_path / "c", {"parent": None})
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    for call in (lambda: resolve_source(out).fingerprint, lambda: load_model(out, device="cpu")):
        with pytest.raises(FlipcheckError, match=r"model\.safetensors: truncated or damaged") as err:
            call()
        assert "\n" not in str(err.value)
    f.write_bytes(b"\x05")
    with pytest.raises(FlipcheckError, match=r"model\.safetensors: not a complete safetensors file"):
        load_model(out, device="cpu")


def test_saved_child_reloads_with_identical_logits_and_tokenizer(tiny_model, tiny_tokenizer, tmp_path):
    out = save_model(tiny_model, tiny_tokenizer, tmp_path / "c", {"parent": "p"})
    model, tok = load_model(out, device="cpu"), load_tokenizer(out)
    ids = torch.tensor([tiny_tokenizer("Question: What color is the cat?").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert json.loads((out / PROVENANCE_FILE).read_text())["bytes_on_disk"] == sum(
        p.stat().st_size for p in out.glob("*.safetensors")
    )


def test_save_replaces_existing_folder_atomically(tiny_model, tiny_tokenizer, tmp_path):
    out = tmp_path / "c"
    save_model(tiny_model, tiny_tokenizer, out, {"run": 1})
    save_model(tiny_model, tiny_tokenizer, out, {"run": 2})
    assert read_provenance(out)["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folders left


def test_defaults_float32_on_cpu():
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype(None, "cuda") is torch.bfloat16
    with pytest.raises(FlipcheckError, match="allowed: float32, float16, bfloat16"):
        resolve_dtype("fp8", "cpu")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FlipcheckError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FlipcheckError, match="no config.json"):
        load_model(tmp_path)


def test_hub_id_without_network_points_to_local_folders(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlipcheckError, match="local folder"):
        load_tokenizer("flipcheck-test/definitely-not-cached-model")


def test_tokenizer_without_pad_token_gets_eos(tiny_tokenizer, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    special = tmp_path / "special_tokens_map.json"
    if special.exists():
        m = json.loads(special.read_text())
        m.pop("pad_token", None)
        special.write_text(json.dumps(m))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "</s>"


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_truncated_weights_through_the_cli_exit_2_with_one_line(tiny_model, tiny_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from flipcheck.cli import app

    parent = save_model(tiny_model, tiny_tokenizer, tmp_path / "p", {"parent": None})
    child = save_model(tiny_model, tiny_tokenizer, tmp_path / "c", {"parent": str(parent)})
    f = child / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    res = CliRunner().invoke(app, ["eval", "-", str(child), "--tasks", "flipcheck_demo_facts", "--limit", "2"])
    assert res.exit_code == 2, res.output
    msg = " ".join(res.stderr.split())
    assert res.stderr.count("error: ") == 1 and "Traceback" not in res.output
    assert f"{f}: truncated or damaged safetensors file" in msg
