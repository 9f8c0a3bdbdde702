"""The architecture table names the right modules, and refuses the families it does not know."""

from __future__ import annotations

import re

import pytest
import torch

from flipcheck.compressors.architectures import ARCHITECTURES, adapter_for, norm_eps, supported_architectures
from flipcheck.errors import FlipcheckError
from flipcheck.tiny import build_llama

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return build_llama(
        64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, model_type=request.param
    )


def test_adapter_names_the_modules(family_model):
    model = family_model
    adapter = adapter_for(model)
    assert adapter.model_type == model.config.model_type
    assert adapter.num_layers == 3 and adapter.hidden_size == 64
    assert adapter.embed_tokens is model.model.embed_tokens
    assert adapter.final_norm is model.model.norm
    assert adapter.lm_head is model.lm_head
    assert adapter.decoder is model.model
    assert not adapter.tied_embeddings
    for i, layer in enumerate(adapter.layers):
        raw = model.model.layers[i]
        assert layer.layer is raw and layer.index == i and layer.prefix == f"model.layers.{i}"
        assert layer.input_norm is raw.input_layernorm
        assert layer.post_attention_norm is raw.post_attention_layernorm
        assert layer.attention is raw.self_attn
        assert layer.attention_inputs == [raw.self_attn.q_proj, raw.self_attn.k_proj, raw.self_attn.v_proj]
        assert layer.attention_output is raw.self_attn.o_proj
        assert layer.mlp is raw.mlp
        assert layer.mlp_inputs == [raw.mlp.gate_proj, raw.mlp.up_proj]
        assert layer.mlp_output is raw.mlp.down_proj
        groups = layer.norm_groups()
        assert groups[0][0] is raw.input_layernorm and groups[0][1] == layer.attention_inputs
        assert groups[1][0] is raw.post_attention_layernorm and groups[1][1] == layer.mlp_inputs
        # every reader takes the norm's width; every writer produces it
        for lin in layer.attention_inputs + layer.mlp_inputs:
            assert lin.in_features == layer.input_norm.weight.shape[0] == 64
        assert layer.attention_output.out_features == layer.mlp_output.out_features == 64
        assert norm_eps(layer.input_norm) == model.config.rms_norm_eps


def test_norm_mappings_match_the_reader_modules(family_model):
    """The regex mappings (llm-compressor's format) select exactly the adapter's modules."""
    model = family_model
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}

    def matching(pattern):
        rx = pattern.removeprefix("re:")
        return {n for n, _ in model.named_modules() if re.match(rx, n)}

    (attn_readers, attn_norm), (mlp_readers, mlp_norm) = adapter.spec.norm_mappings()
    layers = adapter.layers
    assert matching(attn_norm) == {names[id(ly.input_norm)] for ly in layers}
    assert matching(mlp_norm) == {names[id(ly.post_attention_norm)] for ly in layers}
    assert set().union(*map(matching, attn_readers)) == {
        names[id(m)] for ly in layers for m in ly.attention_inputs
    }
    assert set().union(*map(matching, mlp_readers)) == {names[id(m)] for ly in layers for m in ly.mlp_inputs}


def test_tied_embeddings_are_visible():
    tied = build_llama(64, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    assert adapter_for(tied).tied_embeddings
    untied = build_llama(64, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    assert not adapter_for(untied).tied_embeddings


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(FlipcheckError) as err:
        adapter_for(gpt2)
    assert str(err.value) == "unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3"
    assert supported_architectures() == list(ARCHITECTURES) == FAMILIES
    with pytest.raises(FlipcheckError, match="supported: llama"):
        adapter_for(torch.nn.Linear(2, 2))


def test_keep_layers_renumbers_and_trims_the_config():
    model = build_llama(64, hidden_size=64, intermediate_size=128, num_hidden_layers=5, model_type="qwen2")
    model.config.layer_types = [f"full_attention_{i}" for i in range(5)]  # distinguishable entries
    adapter = adapter_for(model)
    originals = [adapter.layer_list[i] for i in (0, 2, 4)]
    adapter.keep_layers([0, 2, 4])
    assert list(model.model.layers) == originals
    assert [ly.self_attn.layer_idx for ly in model.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    assert model.config.layer_types == ["full_attention_0", "full_attention_2", "full_attention_4"]
    with pytest.raises(ValueError):
        adapter.keep_layers([2, 1])
