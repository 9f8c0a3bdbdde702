"""models.py: loading, fingerprints, provenance, and the errors users see first."""

from __future__ import annotations

import json

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
    save_model,
    write_json_atomic,
)


def test_fingerprint_stable_across_save_reload_and_sensitive_to_one_weight(tiny_model, tiny_tokenizer, tmp_path):
    fp = fingerprint(tiny_model)
    out = save_model(tiny_model, tiny_tokenizer, tmp_path / "child", {"parent": None})
    reloaded = load_model(out, device="cpu")
    assert fingerprint(reloaded) == fp
    assert read_provenance(out)["fingerprint"] == fp
    with torch.no_grad():
        reloaded.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert fingerprint(reloaded) != fp


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
