"""Hugging Face causal LM -> GGUF, written with the ``gguf`` package (llama.cpp's own Python library).

No converter ships in a package (llama.cpp's ``convert_hf_to_gguf.py`` lives only in its source
tree), so flipcheck writes the file itself for the architectures it supports: Llama and Mistral
(llama.cpp architecture ``llama``). What a GGUF of them holds, and how it is made here:

- hyperparameters under ``llama.*`` (block count, widths, heads, RMS-norm epsilon, RoPE base and
  dimension count, context length, vocabulary size);
- tensors renamed by ``gguf``'s own name map (``model.layers.N.self_attn.q_proj`` ->
  ``blk.N.attn_q``); the query and key projections permuted from the HF layout, where RoPE rotates
  the two halves of each head (``rotate_half``), to llama.cpp's, where it rotates adjacent pairs:
  rows of each head reordered ``[0, d/2, 1, d/2+1, ...]``; 1-D tensors (norms) float32, the rest
  float32 or float16; a tied output head is left out (llama.cpp reuses the token embedding);
- the vocabulary as a byte-level BPE (``tokenizer.ggml.model = gpt2``): every token by id, its type
  (normal, control for special added tokens, user-defined for other added tokens, unused for ids
  the tokenizer does not name), the merges, the special token ids and BOS handling
  (``gguf.SpecialVocab``), and llama.cpp's name for the pre-tokenizer, read off tokenizer.json.

flipcheck always hands llama.cpp token ids made by the Hugging Face tokenizer, so its scores do
not depend on llama.cpp's own tokenizer; the pre-tokenizer name matters to a user who runs the file
in llama.cpp, Ollama or LM Studio.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipcheck.errors import FlipcheckError
from flipcheck.extras import require_llamacpp
from flipcheck.models import adds_bos

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral")  # config.model_type values written as llama.cpp's "llama" architecture


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order of a q/k projection -> llama.cpp's interleaved pairs, per head."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0) or 10000.0)


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise FlipcheckError(
            f"gguf: RoPE scaling {kind!r} is not supported by flipcheck's converter (plain RoPE only); "
            "convert with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file"
        )


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json: ``gpt-2`` (byte-level with GPT-2's
    split), ``smollm`` (digits split one by one, then GPT-2's), ``llama-bpe`` (Llama 3's split
    pattern), else ``default``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "default"
    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    splits = [p for p in parts if p.get("type") == "Split"]
    if byte_level and byte_level[0].get("use_regex", True) and not splits:
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if digits and len(parts) == 2:
            return "smollm"
    if splits and any("(?i:'s|'t|'re|'ve|'m|'ll|'d)" in str(p.get("pattern", {}).get("Regex", "")) for p in splits):
        return "llama-bpe"
    log.info("gguf: pre-tokenizer %s has no llama.cpp name here; writing 'default'", kinds)
    return "default"


def _vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id (byte-level BPE strings, as tokenizer.json holds them) and their GGUF types."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    return tokens, types


def write_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, *, dtype: str = "F32",
               name: str | None = None, tokenizer_folder: str | os.PathLike | None = None) -> Path:
    """Write `model` (a Llama/Mistral causal LM in memory) and its tokenizer as one GGUF file.

    `dtype`: ``F32`` or ``F16`` for 2-D tensors (1-D tensors are always float32).
    `tokenizer_folder`: a folder holding the tokenizer's files (merges and special tokens are read
    from there by ``gguf.SpecialVocab``); by default the tokenizer is saved to a temporary folder.
    """
    import gguf

    config = model.config
    _check_convertible(config, dtype)
    emb = model.get_input_embeddings().weight
    n_vocab = int(emb.shape[0])
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_hparams(writer, config, n_vocab, dtype, name)
    _add_tokenizer(writer, tokenizer, n_vocab, tokenizer_folder)
    _add_tensors(writer, model, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _check_convertible(config, dtype: str) -> None:
    """Refuse (one line) an architecture, dtype, RoPE scaling or bias the converter does not write."""
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED:
        raise FlipcheckError(
            f"gguf: flipcheck converts {', '.join(SUPPORTED)} models; {mtype!r} is not one of them "
            "(convert with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file)"
        )
    if dtype not in ("F32", "F16"):
        raise FlipcheckError(f"gguf: conversion dtype {dtype!r}: allowed F32, F16 (other types come from llama.cpp's quantizer)")
    _check_rope(config)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FlipcheckError("gguf: Llama models with attention or MLP biases are not supported by flipcheck's converter")


def _dims(config) -> tuple[int, int, int, int, int]:
    """(layers, attention heads, key/value heads, hidden size, head dimension) of a Llama config."""
    n_layer = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    return n_layer, n_head, n_kv, hidden, head_dim


def _add_hparams(writer, config, n_vocab: int, dtype: str, name: str | None) -> None:
    """The ``llama.*`` hyperparameters llama.cpp reads to build the graph."""
    import gguf

    n_layer, n_head, n_kv, hidden, head_dim = _dims(config)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)


def _add_tokenizer(writer, tokenizer, n_vocab: int, tokenizer_folder: str | os.PathLike | None) -> None:
    """The byte-level BPE vocabulary, its merges and special tokens, and whether a BOS is added."""
    import tempfile

    import gguf

    tokens, types = _vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tokenizer_folder) if tokenizer_folder else Path(tmp)
        if not tokenizer_folder:
            tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise FlipcheckError("gguf: the tokenizer has no BPE merges; flipcheck's converter writes byte-level BPE vocabularies")
        special.add_to_gguf(writer)
    # llama.cpp's default BOS handling differs by vocabulary type: say what the HF tokenizer does
    if "tokenizer.ggml.add_bos_token" not in writer.kv_data[0]:
        writer.add_add_bos_token(adds_bos(tokenizer))


def _add_tensors(writer, model: torch.nn.Module, dtype: str) -> None:
    """Every weight under its GGUF name; q/k rows permuted to llama.cpp's RoPE layout, 1-D ones in float32."""
    import gguf

    config = model.config
    n_layer, n_head, n_kv, _, _ = _dims(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    float_dtype = np.float32 if dtype == "F32" else np.float16
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise FlipcheckError(f"gguf: no GGUF name for tensor {hf_name!r}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_rope(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_rope(data, n_kv)
        data = data.astype(np.float32 if data.ndim == 1 else float_dtype)
        writer.add_tensor(gname, np.ascontiguousarray(data))


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`_permute_rope`: llama.cpp's interleaved pairs back to HF's rotate-half rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@torch.no_grad()
def load_gguf_weights(model: torch.nn.Module, path: str | os.PathLike) -> int:
    """Copy a GGUF's weights, dequantized to float by the ``gguf`` package, into `model` (the model the
    file was written from: same architecture and names). Returns the tensors copied. Afterwards the
    in-memory model computes what transformers computes from the file (``gguf_file=``)."""
    import gguf
    from gguf import GGUFReader

    config = model.config
    n_layer, n_head = int(config.num_hidden_layers), int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tensors = {t.name: t for t in GGUFReader(str(path), "r").tensors}
    state = model.state_dict()
    copied = 0
    for hf_name, target in state.items():
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None or gname not in tensors:
            continue  # a tied head (the embedding's), rotary buffers
        t = tensors[gname]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(target.shape))
        if hf_name.endswith("q_proj.weight"):
            data = _unpermute_rope(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _unpermute_rope(data, n_kv)
        target.copy_(torch.from_numpy(np.ascontiguousarray(data)).to(target.dtype))
        copied += 1
    return copied


QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0",
               "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL")


#: ggml tensor types a decoder layer's tensors may be given (llama-quantize --tensor-type's values)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")


def tensor_overrides(layers: Mapping[int, str]):
    r"""llama.cpp's per-tensor type overrides (``llama_model_quantize_params.tt_overrides``: what
    ``llama-quantize --tensor-type PATTERN=TYPE`` fills): one regex per type, ``^blk\.(i|j|...)\.``,
    naming every tensor of those decoder layers; the array ends with a null pattern. Returns the
    ctypes array (kept alive by the caller while llama.cpp reads it)."""
    import ctypes

    import llama_cpp
    from gguf import GGMLQuantizationType

    by_type: dict[str, list[int]] = {}
    for i, t in sorted(layers.items()):
        by_type.setdefault(t, []).append(i)
    arr = (llama_cpp.llama_model_tensor_override * (len(by_type) + 1))()
    for k, (t, idx) in enumerate(sorted(by_type.items())):
        arr[k].pattern = ("^blk\\.(" + "|".join(str(i) for i in idx) + ")\\.").encode()
        arr[k].type = int(GGMLQuantizationType[t].value)
    arr[len(by_type)].pattern = None
    return arr, ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, type_name: str, *, threads: int | None = None,
                  layers: Mapping[int, str] | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``) from a float GGUF to `type_name`; `layers`
    gives decoder layers their own ggml tensor type through llama.cpp's per-tensor overrides."""
    require_llamacpp("gguf quantization")
    import llama_cpp

    if type_name not in QUANT_TYPES:
        raise FlipcheckError(f"gguf: type {type_name!r}: allowed {', '.join(QUANT_TYPES)}")
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if type_name == "F32" else f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads or max(1, torch.get_num_threads()))
    keep = None
    if layers:
        if not hasattr(params, "tt_overrides"):
            raise FlipcheckError("gguf: per-layer types need llama-cpp-python with llama_model_quantize_params.tt_overrides "
                                 "(0.3.36 has it)")
        keep, params.tt_overrides = tensor_overrides(layers)
    with _quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    del keep
    if rc != 0:
        raise FlipcheckError(f"gguf: llama.cpp's quantizer failed on {type_name} (code {rc})")
    return Path(dst)


class _quiet_stderr:
    """llama.cpp's quantizer reports every tensor on the C stderr; keep it out of the terminal."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._saved = os.dup(2)
        self._tmp = tempfile.TemporaryFile()
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        tail = self._tmp.read()[-2000:].decode(errors="replace")
        self._tmp.close()
        if exc[0] is not None and tail:
            log.warning("llama.cpp: %s", tail)
        else:
            log.debug("llama.cpp quantizer: %s", tail)


def gguf_bits(path: str | os.PathLike) -> dict[str, Any]:
    """Storage of a GGUF's decoder linear weights (``blk.*`` 2-D tensors): bits per weight, parameters,
    and the tensor types used (llama.cpp falls back to other types where a row does not fit a block)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    bits = n = total = 0
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        total += int(t.n_elements)
        if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2:
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return {"bits_per_weight": bits / n if n else 0.0, "parameters": total, "tensor_types": kinds}
