"""Round-to-nearest quantization, the baseline every calibrated method is measured against, run by
llm-compressor's ``QuantizationModifier`` with any compressed-tensors preset scheme.

Each weight group (a tensor, an output channel, or `group_size` consecutive input weights) gets
its scale from its own range, and every weight is rounded independently:

    s = max|W_g| / q_max  (symmetric),    q = clamp(round(W / s) + z, q_min, q_max),    Ŵ = s·(q - z)

Asymmetric schemes (W4A16_ASYM) use s = (max W_g - min W_g) / (q_max - q_min) and a zero point z.
Schemes with activation quantization quantize activations at run time: dynamically per token
(W8A8, FP8_DYNAMIC: no data needed) or with static scales observed on calibration data (FP8,
NVFP4: those need calibration).

``layers`` gives decoder layers their own preset (``{"0-3": "W8A16"}``, "none" to leave them
unquantized; see :mod:`flipcheck.compressors.per_layer`); a per-layer preset takes the step's
group_size where its layout can change and its serving layout allows it, else its own layout.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from flipcheck.compressors.llmc import check_serving_layout, needs_data, quant_groups, regroupable
from flipcheck.compressors.per_layer import KEEP, parse_layer_map
from flipcheck.compressors.registry import MethodConfig, none_from_text, register


def preset_schemes() -> list[str]:
    """compressed-tensors' preset scheme names (W4A16, W8A8, FP8, NVFP4, ...), less UNQUANTIZED."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return sorted(k for k in PRESET_SCHEMES if k != "UNQUANTIZED")


class RTNConfig(MethodConfig):
    """Round-to-nearest quantization with a preset scheme, no calibration (llm-compressor QuantizationModifier)."""

    scheme: str = Field("W4A16", description="compressed-tensors preset: W4A16, W4A16_ASYM, W8A16, W8A8, FP8_DYNAMIC, FP8, ...")
    group_size: int | Literal["channel"] | None = Field(
        None, description="None = the scheme's own layout; an int = groups of that many input weights; 'channel' = per output channel"
    )

    layers: dict[str, str] | None = Field(
        None, description="per-layer presets {range: scheme or 'none'}, e.g. {'0-3': W8A16}; other layers take `scheme`"
    )

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme(cls, v):
        if not isinstance(v, str):
            raise ValueError(f"scheme must be a preset name, got {v!r}")
        allowed = preset_schemes()
        if v.upper() not in allowed:
            raise ValueError(f"unknown scheme {v!r}; allowed: {', '.join(allowed)}")
        return v.upper()

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any):
        return parse_layer_map(v, _layer_preset)

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v):
        v = none_from_text(v)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"group_size must be >= 1, 'channel' or None, got {v}")
        return v

    no_data_hint: ClassVar[str] = (
        "this scheme quantizes activations with static scales; use a dynamic scheme (W8A8, FP8_DYNAMIC) "
        "or give the step calibration data"
    )

    @model_validator(mode="after")
    def _layout(self):
        if self.group_size is not None and not regroupable(self.scheme):
            ok = ", ".join(s for s in preset_schemes() if regroupable(s))
            raise ValueError(
                f"scheme {self.scheme} has a fixed weight layout, group_size must be None; "
                f"schemes whose group size can change: {ok}"
            )
        check_serving_layout(self.scheme, self.group_size)
        return self


def _layer_preset(value: Any) -> str:
    v = str(value).strip().upper()
    if v == KEEP.upper():
        return KEEP
    if v not in preset_schemes():
        raise ValueError(f"layers: scheme {value!r} is not allowed; allowed: {', '.join(preset_schemes())}, {KEEP}")
    return v


def rtn_modifiers(config: RTNConfig, head: str, model=None) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    layout = "preset" if config.group_size is None else config.group_size
    groups, ignore = quant_groups(config.scheme, layout, config.layers, model, head)
    return [QuantizationModifier(config_groups=groups, ignore=ignore)]


def rtn_needs_data(config: RTNConfig) -> bool:
    """Only schemes with static activation scales (FP8, NVFP4, ...) need calibration data; with
    per-layer presets, when any of them does."""
    schemes = {config.scheme, *(v for v in (config.layers or {}).values() if v != KEEP)}
    return any(needs_data(rtn_modifiers(config.model_copy(update={"scheme": s, "layers": None}), "lm_head"))
               for s in sorted(schemes))


register("rtn", RTNConfig, modifiers=rtn_modifiers, needs_calibration=rtn_needs_data, produces="quantized")
