"""SmoothQuant W8A8 (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", ICML 2023, arXiv 2211.10438), run by llm-compressor's
``SmoothQuantModifier`` followed by ``GPTQModifier(scheme="W8A8")``.

Activations have a few outlier channels that wreck per-token int8 quantization; weights do not.
SmoothQuant moves the difficulty from activations to weights with a per-channel scale s folded
into the preceding norm (X / s) and the following Linears (s · W), leaving the function unchanged:

    Y = (X diag(s)^-1) · (diag(s) W),    s_j = max|X_j|^α / max|W_j|^(1-α)

α = `alpha` sets how much is migrated (0.5 in the paper for most models). Then every Linear is
quantized to W8A8: int8 weights per output channel (rounded with GPTQ) and int8 activations
quantized dynamically per token at run time.

Departure from the paper, inherited from llm-compressor: the activation statistic is the range
max(X_j) - min(X_j) observed on the calibration data rather than max|X_j|, and the weight
statistic is 2·max|W_j| over the Linears sharing that input (for symmetric activations the two
agree).
"""

from __future__ import annotations

from pydantic import Field

from flipcheck.compressors.llmc import quant_scheme
from flipcheck.compressors.registry import MethodConfig, register


class SmoothQuantConfig(MethodConfig):
    """SmoothQuant: migrate activation outliers into the weights, then W8A8 (int8 weights and tokens)."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength α: 0 = none to the weights, 1 = all")
    dampening_frac: float = Field(0.01, ge=0.0, le=1.0, description="GPTQ's λ for the int8 weight rounding")
    block_size: int = Field(128, ge=1, le=8192, description="GPTQ columns per block")


def smoothquant_modifiers(config: SmoothQuantConfig, head: str) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    return [
        SmoothQuantModifier(smoothing_strength=config.alpha),
        GPTQModifier(
            config_groups={"group_0": quant_scheme("W8A8")},
            ignore=[head],
            dampening_frac=config.dampening_frac,
            block_size=config.block_size,
        ),
    ]


register("smoothquant", SmoothQuantConfig, modifiers=smoothquant_modifiers, needs_calibration=True, produces="quantized")
