"""Settings shared by the pruning methods (wanda, sparsegpt): how many weights to zero, and in
what pattern (unstructured, or N:M semi-structured), optionally per decoder layer.

Per-layer sparsity (``layers: {"0-3": 0.3, "20-29": 0.6}``; other layers take ``sparsity``) goes to
llm-compressor as its list form of ``sparsity``: one value per module its ``targets`` match, in
``match_named_modules`` order (the order the engine walks them). Layers at sparsity 0 are ignored
(SparseGPT would otherwise still zero one weight per block).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from flipcheck.compressors.per_layer import decoder_linears, expand, parse_layer_map
from flipcheck.compressors.registry import MethodConfig, none_from_text
from flipcheck.errors import FlipcheckError

_MASK = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_mask(mask: str) -> tuple[int, int]:
    """'N:M' -> (N, M): at most N non-zeros in every M consecutive input weights (the N:M
    convention of NVIDIA's sparse tensor cores and the Wanda/SparseGPT papers; 2:4 = 50 %)."""
    match = _MASK.match(str(mask))
    if not match:
        raise ValueError(f"mask must look like 'N:M' (e.g. '2:4', '4:8'), got {mask!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not (1 <= n < m <= 256):
        raise ValueError(f"mask {mask!r}: need 1 <= N < M <= 256 (N weights kept of every M), e.g. '2:4', '4:8'")
    return n, m


class PruningConfig(MethodConfig):
    """Settings shared by the pruning methods: how many weights to zero, and in what pattern."""

    sparsity: float = Field(
        0.5, ge=0.0, lt=1.0, description="fraction of each targeted weight zeroed (0 = identity); implied by mask when set"
    )
    mask: str | None = Field(
        None, description="'N:M' semi-structured mask: keep N of every M consecutive input weights ('2:4', '4:8'); None = unstructured"
    )

    layers: dict[str, float] | None = Field(
        None, description="per-layer sparsity {range: fraction}, e.g. {'0-3': 0.2}; other layers take `sparsity` "
        "(--set layers=0-3:0.2,20-29:0.6); unstructured only"
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any):
        return parse_layer_map(v, _fraction)

    @field_validator("mask", mode="before")
    @classmethod
    def _check_mask(cls, v):
        v = none_from_text(v)
        if v is None:
            return v
        n, m = parse_mask(v)
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _mask_vs_sparsity(self):
        if self.mask is not None and "sparsity" in self.model_fields_set:
            n, m = parse_mask(self.mask)
            if abs(self.sparsity - (m - n) / m) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity} conflicts with mask={self.mask!r}, which zeroes {(m - n) / m:g} "
                    "of the weights; set only one of them"
                )
        if self.mask is not None and self.layers:
            raise ValueError("layers (per-layer sparsity) works with unstructured sparsity only; drop mask or layers")
        return self

    def engine_args(self) -> dict[str, Any]:
        """llm-compressor's spelling: ``mask_structure='Z:M'`` with Z = weights *zeroed* per M."""
        if self.mask is None:
            return {"sparsity": self.sparsity, "mask_structure": "0:0"}
        n, m = parse_mask(self.mask)
        return {"sparsity": (m - n) / m, "mask_structure": f"{m - n}:{m}"}

    def is_identity(self) -> bool:
        return self.mask is None and self.sparsity == 0.0 and not any((self.layers or {}).values())

    def pruning_args(self, model, head_ignore: list[str]) -> dict[str, Any]:
        """``engine_args`` plus ``targets`` and ``ignore``; with per-layer sparsity, the engine's
        list form of ``sparsity`` (one value per targeted module) and layers at 0 ignored."""
        if not self.layers:
            return {"targets": ["Linear"], "ignore": head_ignore, **self.engine_args()}
        if model is None:
            raise FlipcheckError("per-layer sparsity (layers=...) needs the model to name each layer's Linears")
        from compressed_tensors.utils import match_named_modules

        prefix, names = decoder_linears(model)
        per = expand(self.layers, len(names))
        layer_of = {f"{prefix}.{i}.{n}": i for i, ns in enumerate(names) for n in ns}
        values, ignore = [], list(head_ignore)
        for name, _ in match_named_modules(model, ["Linear"]):
            value = per.get(layer_of[name], self.sparsity) if name in layer_of else self.sparsity
            values.append(float(value))
            if value == 0.0:
                ignore.append(f"re:^{re.escape(name)}\\.?$")
        return {"targets": ["Linear"], "ignore": ignore, "sparsity": values, "mask_structure": "0:0"}


def _fraction(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"layers: sparsity {value!r} is not a number; allowed: 0 <= sparsity < 1") from None
    if not (0.0 <= v < 1.0):
        raise ValueError(f"layers: sparsity {value!r} is out of range; allowed: 0 <= sparsity < 1")
    return v


def pruning_needs_data(config: PruningConfig) -> bool:
    """Pruning scores need activations, except at sparsity 0 where nothing runs."""
    return not config.is_identity()
