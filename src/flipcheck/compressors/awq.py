"""AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024, arXiv 2306.00978), run by
llm-compressor's ``AWQModifier`` followed by ``QuantizationModifier(W4A16_ASYM)``.

The few input channels that see large activations matter most. AWQ scales them up before
rounding and folds the inverse scale into the preceding op (a norm or a Linear), so the function
is unchanged and the salient weights lose less to rounding:

    Q(W · diag(s)) · (diag(s)^-1 · X),    s = s_X^α · s_W^-(1-α)   (duo scaling)

with s_X the mean |activation| per input channel and s_W the mean |weight| per input channel
(normalised per group). For each group of Linears that share an input, α is searched on `n_grid`
evenly spaced points of [0, 1] (with duo scaling: the identity s = 1 plus n_grid - 1 points),
minimising the group's output MSE on the calibration data. With ``duo_scaling=False`` only
activations count (s = s_X^α, the paper's form); "both" searches half the grid each way.

Weights end as 4-bit asymmetric integers with one scale and zero point per `group_size` input
weights: W ≈ s·(q - z), with q ∈ [-8, 7] and an integer zero point z
(compressed-tensors keeps the codes signed).

``layers`` gives decoder layers their own scheme (``{"0-3": "W8A16"}``, "none" to leave them
unquantized), as for ``gptq``: the quantization modifier gets one config group per scheme whose
targets name exactly those layers' Linears (:func:`~flipcheck.compressors.llmc.quant_groups`), and
llm-compressor's AWQ searches each smoothing group's scales against its balance layers' own
quantization arguments (a group whose Linears are all "none" is not smoothed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from flipcheck.compressors.llmc import quant_groups
from flipcheck.compressors.per_layer import KEEP, parse_layer_map
from flipcheck.compressors.registry import MethodConfig, none_from_text, register

#: the schemes an AWQ layer may take (W4A16_ASYM: the paper's; the others for per-layer mixes)
AWQ_SCHEMES = ("W4A16_ASYM", "W4A16", "W8A16")


class AWQConfig(MethodConfig):
    """AWQ W4A16 (asymmetric): salient input channels scaled up before rounding (llm-compressor)."""

    scheme: Literal[AWQ_SCHEMES] = Field(  # type: ignore[valid-type]
        "W4A16_ASYM", description="weight scheme of every layer `layers` does not name (the paper: W4A16_ASYM)")

    group_size: int | None = Field(
        128, ge=1, le=65536, description="input weights sharing one scale and zero point; None = per output channel"
    )
    n_grid: int = Field(20, ge=4, le=200, description="grid points searched for the scaling exponent α in [0, 1]")
    duo_scaling: bool | Literal["both"] = Field(
        True, description="True: s = s_X^α / s_W^(1-α); False: s = s_X^α (the paper); 'both': search both"
    )

    layers: dict[str, str] | None = Field(
        None, description="per-layer schemes {range: scheme or 'none'}, e.g. {'0-3': W8A16}; other layers take `scheme`")

    @field_validator("group_size", mode="before")
    @classmethod
    def _none(cls, v):
        return none_from_text(v)

    @field_validator("scheme", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any):
        return parse_layer_map(v, _awq_scheme)


def _awq_scheme(value: Any) -> str:
    v = str(value).strip().upper()
    if v == KEEP.upper():
        return KEEP
    if v not in AWQ_SCHEMES:
        raise ValueError(f"layers: scheme {value!r} is not allowed; allowed: {', '.join(AWQ_SCHEMES)}, {KEEP}")
    return v


def awq_modifiers(config: AWQConfig, head: str, model=None) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    groups, ignore = quant_groups(config.scheme, config.group_size, config.layers, model, head)
    return [
        AWQModifier(n_grid=config.n_grid, duo_scaling=config.duo_scaling),
        QuantizationModifier(config_groups=groups, ignore=ignore),
    ]


register("awq", AWQConfig, modifiers=awq_modifiers, needs_calibration=True, produces="quantized")
