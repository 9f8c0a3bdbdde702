"""Calibration data shared by every step of a recipe: N samples of L tokens, seeded.

Prepared once per run (:func:`flipcheck.compressors.calibration_data.build_calibration`) and handed to each method's ``apply``. Methods
that need no data (noise, rtn, bnb, layer_drop ``last``) still get the object for its tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class CalibrationConfig(BaseModel):
    """Where calibration text comes from and how much of it to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "demo",
        description="'demo' (the demo task's text), a local .txt/.jsonl file or folder, or a Hugging Face "
        "dataset as 'hf:NAME[:CONFIG[:SPLIT]]' (e.g. hf:wikitext:wikitext-2-raw-v1:train)",
    )
    samples: int = Field(32, ge=1, le=100_000, description="number of calibration sequences")
    seq_len: int = Field(256, ge=8, le=131_072, description="tokens per calibration sequence")
    seed: int = Field(0, ge=0, description="seed for choosing and cutting the samples")


@dataclass
class Calibration:
    """Tokenized calibration samples plus the tokenizer the engines need."""

    tokenizer: Any
    input_ids: torch.Tensor | None = None  # (samples, seq_len) int64; None when no step needs data
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Statistics that do not depend on a swept setting (SliceGPT's PCA rotations, layer-drop angular
    # distances), computed once on the parent and reused by every point of a sweep. Keyed by
    # (method, what, parent fingerprint or id).
    memo: dict[Any, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any] | None:
        if self.input_ids is None:
            return None
        return {**self.config.model_dump(), "tokens": int(self.input_ids.numel())}

    def require(self, method: str, hint: str = "") -> torch.Tensor:
        return require_ids(self, method, hint)

    def dataset(self):
        """A ``datasets.Dataset`` with input_ids and attention_mask, the form oneshot takes."""
        from datasets import Dataset

        ids = self.require("this step")
        return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    def batches(self, batch_size: int = 8):
        ids = self.require("this step")
        for i in range(0, ids.shape[0], batch_size):
            yield ids[i : i + batch_size]


def memoized(calibration: Calibration | None, model: torch.nn.Module, what: str, compute: Callable[[], T]) -> T:
    """`compute()` once per (what, model weights) in this run; later sweep points reuse it.

    Keyed by the weights' fingerprint, so a statistic computed on the parent is reused only by
    steps that see the parent's exact weights (the first step of each child), never after another
    step changed them.
    """
    if calibration is None:
        return compute()
    from flipcheck.models import fingerprint

    key = (what, fingerprint(model))
    if key not in calibration.memo:
        calibration.memo[key] = compute()
    return calibration.memo[key]


def require_ids(calibration: Calibration | None, method: str, hint: str = "") -> torch.Tensor:
    """The calibration token ids, or a FlipcheckError saying `method` needs them (plus `hint`)."""
    ids = None if calibration is None else calibration.input_ids
    if ids is None:
        from flipcheck.errors import FlipcheckError

        raise FlipcheckError(f"{method} needs calibration data, but none was prepared" + (f"; {hint}" if hint else ""))
    return ids
