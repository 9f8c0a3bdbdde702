"""GPTQ weight quantization (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv 2210.17323), run by llm-compressor's
``GPTQModifier``.

Layer by layer, GPTQ minimises the layer's output error on calibration inputs X,

    argmin_Q ||W X - Q X||_2^2,    H = 2 X X^T + λ·mean(diag(H))·I   (λ = dampening_frac),

quantizing one column at a time and spreading its rounding error over the columns not yet
quantized through the inverse Hessian: δ = -(w_q - q_q) / [H^-1]_qq · [H^-1]_{q,:}. Columns are
processed in blocks of `block_size`; with ``actorder="weight"`` they are visited in order of
decreasing diag(H) (the most activated inputs first), which changes nothing in the checkpoint.

Weights become b-bit integers with one scale per `group_size` consecutive input weights (symmetric
schemes) plus a zero point (asymmetric ones): W ≈ s·(q - z).

``layers`` gives decoder layers their own scheme (``{"0-3": "W8A16", "4-29": "W4A16"}``, "none"
to leave a layer unquantized; see :mod:`flipcheck.compressors.per_layer`): one GPTQ run with one
``config_groups`` entry per scheme. Per-layer schemes take the step's group_size, except W8A8,
which keeps its per-channel serving layout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flipcheck.compressors.llmc import check_serving_layout, preset_group_size, quant_groups
from flipcheck.compressors.per_layer import KEEP, parse_layer_map
from flipcheck.compressors.registry import MethodConfig, none_from_text, register


class GPTQConfig(MethodConfig):
    """GPTQ: Hessian-aware rounding of weights to b-bit integers (llm-compressor GPTQModifier)."""

    scheme: Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8"] = Field(
        "W4A16", description="weight (and activation) format: W4A16 = int4 weights, 16-bit activations"
    )
    group_size: int | None = Field(
        128,
        ge=1,
        le=65536,
        description="input weights sharing one scale; None = one scale per output channel. Default: the "
        "scheme's preset (128; per channel for W8A8, the layout vLLM's W8A8 kernels take)",
    )
    actorder: Literal["none", "weight"] = Field(
        "weight", description="'weight': quantize columns in order of decreasing activation (no runtime cost); 'none': in order"
    )
    dampening_frac: float = Field(
        0.01, ge=0.0, le=1.0, description="λ added to diag(H) as a fraction of its mean, for a stable inverse"
    )
    block_size: int = Field(128, ge=1, le=8192, description="columns quantized per block before the lazy error update")
    layers: dict[str, str] | None = Field(
        None, description="per-layer schemes {range: scheme or 'none'}, e.g. {'0-3': W8A16}; "
        "other layers take `scheme` (--set layers=0-3:W8A16,4-29:W4A16)"
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any):
        return parse_layer_map(v, _gptq_scheme)

    @model_validator(mode="before")
    @classmethod
    def _preset_layout(cls, data):
        """Without an explicit group_size, take the preset's (W8A8: per channel)."""
        if isinstance(data, dict) and "group_size" not in data and isinstance(data.get("scheme"), str):
            scheme = data["scheme"].upper()
            if scheme in ("W4A16", "W4A16_ASYM", "W8A16", "W8A8"):
                data = {**data, "group_size": preset_group_size(scheme)}
        return data

    @model_validator(mode="after")
    def _serving_layout(self):
        check_serving_layout(self.scheme, self.group_size)
        return self

    @field_validator("scheme", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v

    @field_validator("group_size", mode="before")
    @classmethod
    def _none(cls, v):
        return none_from_text(v)

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, v):
        if v is None or v is False:
            return "none"
        if isinstance(v, str) and v.lower() in ("group", "dynamic"):
            raise ValueError(
                "actorder 'group' (dynamic activation ordering) is not supported by llm-compressor >= 0.14; "
                "allowed: none, weight"
            )
        if isinstance(v, str) and v.lower() == "static":
            return "weight"
        return v.lower() if isinstance(v, str) else v


_SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8")


def _gptq_scheme(value: Any) -> str:
    """A per-layer value: one of GPTQ's schemes, or 'none' (leave the layer unquantized)."""
    v = str(value).strip().upper()
    if v == KEEP.upper():
        return KEEP
    if v not in _SCHEMES:
        raise ValueError(f"layers: scheme {value!r} is not allowed; allowed: {', '.join(_SCHEMES)}, {KEEP}")
    return v


def gptq_modifiers(config: GPTQConfig, head: str, model=None) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    groups, ignore = quant_groups(config.scheme, config.group_size, config.layers, model, head)
    return [
        GPTQModifier(
            config_groups=groups,
            ignore=ignore,
            block_size=config.block_size,
            dampening_frac=config.dampening_frac,
            actorder=None if config.actorder == "none" else config.actorder,
        )
    ]


register("gptq", GPTQConfig, modifiers=gptq_modifiers, needs_calibration=True, produces="quantized")
