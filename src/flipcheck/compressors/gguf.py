"""GGUF children: the model written as a GGUF file and quantized by llama.cpp's own quantizer.

    flipcheck compress PARENT --method gguf --set type=Q4_K_M --out DIR

The in-memory model (the parent, or what earlier steps of a chain left: ``wanda -> gguf``) is
written as a float32 GGUF (:mod:`flipcheck.compressors.gguf_convert`) and, for any other type,
quantized with ``llama_model_quantize`` (llama-cpp-python), exactly as ``llama-quantize`` does it:
the same K-quant mixes (Q4_K_M keeps some tensors at Q6_K), the same fallbacks where a row length
does not fit a 256-wide super-block (SmolLM2's 576 is not a multiple of 256: those tensors get
Q5_0/Q8_0/...). DIR holds the ``.gguf``, the parent's tokenizer files and ``flipcheck.json``; the
llama.cpp engine scores it as it will be served.

``layers`` gives decoder layers their own ggml tensor type (``{"0-3": "Q8_0"}``): llama.cpp's
per-tensor overrides, what ``llama-quantize --tensor-type 'blk\\.(0|1|2|3)\\.=q8_0'`` does, reached
through ``llama_model_quantize_params.tt_overrides`` of llama-cpp-python (0.3.36): one regex
``^blk\\.(i|j|…)\\.`` per type (:func:`~flipcheck.compressors.gguf_convert.tensor_overrides`).
``search`` does not choose GGUF types per layer yet (its sensitivities swap torch layers of the
child into the parent; a GGUF child's are llama.cpp's).

No importance matrix: llama-cpp-python's quantizer takes one only as a pointer to llama.cpp's
C++ map, which its Python binding cannot build (``llama-imatrix`` is not packaged); IQ4_XS and the
other types here quantize without one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from flipcheck.compressors.gguf_convert import (
    QUANT_TYPES,
    TENSOR_TYPES,
    gguf_bits,
    load_gguf_weights,
    quantize_gguf,
    write_gguf,
)
from flipcheck.compressors.per_layer import expand, parse_layer_map
from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.stats import measure

log = logging.getLogger(__name__)

GGUFType = Literal[QUANT_TYPES]  # type: ignore[valid-type]


class GGUFConfig(MethodConfig):
    """GGUF file quantized by llama.cpp (F32, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, ...)."""

    type: GGUFType = Field("Q4_K_M", description="llama.cpp quantization type (llama-quantize's names)")
    layers: dict[str, str] | None = Field(
        None, description="per-layer ggml tensor types {range: type}, e.g. {'0-3': Q8_0}, through llama.cpp's per-tensor "
        "overrides (llama-quantize --tensor-type); other layers follow `type` (--set layers=0-3:Q8_0)")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any):
        return parse_layer_map(v, _tensor_type)


def _tensor_type(value: Any) -> str:
    """A per-layer value: a ggml tensor type (not a mix such as Q4_K_M: one type per tensor)."""
    v = str(value).strip().upper()
    if v not in TENSOR_TYPES:
        raise ValueError(f"layers: tensor type {value!r} is not allowed; allowed: {', '.join(TENSOR_TYPES)}")
    return v


def gguf_name(config: GGUFConfig) -> str:
    return f"model-{config.type}.gguf"


def apply_gguf(model: torch.nn.Module, config: GGUFConfig, calibration) -> CompressionReport:
    """Write `model` as GGUF and quantize it; the file waits in a temporary folder for the save
    (``extra["gguf_file"]``). The in-memory model then holds the file's weights dequantized (what
    transformers computes from the file; llama.cpp's own kernels also round activations)."""
    tokenizer = getattr(calibration, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("gguf needs the tokenizer (the calibration object carries it)")
    tmp = Path(tempfile.mkdtemp(prefix="flipcheck-gguf-"))
    f32 = write_gguf(model, tokenizer, tmp / "model-F32.gguf")
    out = tmp / gguf_name(config)
    layers = expand(config.layers, int(getattr(model.config, "num_hidden_layers", 0) or 0)) if config.layers else None
    if config.type == "F32" and not layers:
        f32.rename(out)
    else:
        quantize_gguf(f32, out, config.type, layers=layers)
        f32.unlink()
    stats = gguf_bits(out)
    sparsity = measure(model).sparsity  # zeros an earlier step (wanda, sparsegpt) left, before quantization
    load_gguf_weights(model, out)
    return CompressionReport(
        method="gguf", config=config.model_dump(mode="json"), parameters=int(stats["parameters"]),
        bits_per_weight=float(stats["bits_per_weight"]), sparsity=float(sparsity),
        targeted=sum(stats["tensor_types"].values()),
        extra={"gguf_file": str(out), "tensor_types": stats["tensor_types"], "provenance": {"gguf": out.name}},
    )


register("gguf", GGUFConfig, apply_gguf, needs_calibration=False, accepts={"dense", "sparse"}, produces="gguf",
         description="GGUF file quantized by llama.cpp's own quantizer (a final step)")
