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

from flipcheck.errors import FlipcheckError

T = TypeVar("T")

# The default calibration text of a real parent, as llm-compressor's examples use it.
DEFAULT_SOURCE = "hf:wikitext:wikitext-2-raw-v1:train"


class CalibrationConfig(BaseModel):
    """Where calibration text comes from and how much of it to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = Field(
        None,
        description="a local .txt/.jsonl file or folder, a Hugging Face dataset as 'hf:NAME[:CONFIG[:SPLIT]]' "
        "(SPLIT may be sliced, e.g. hf:allenai/c4:en:train[:1000], read by streaming), or a named source "
        "('demo': the demo's facts). Default: the text the parent's flipcheck.json names (the demo "
        f"parent names its facts), else {DEFAULT_SOURCE}",
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
    # Statistics that do not depend on a swept setting (SliceGPT's parent PCA, layer-drop angular
    # distances), computed once on the parent and reused by every point of a sweep, keyed by
    # (what, parent_key). The pipeline sets parent_key to the parent's fingerprint while a child's
    # first step runs (the model then holds the parent's exact weights) and to None otherwise.
    memo: dict[Any, Any] = field(default_factory=dict)
    parent_key: str | None = None

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


def memoized(calibration: Calibration | None, what: str, compute: Callable[[], T]) -> T:
    """`compute()` once per (what, parent) in this run; later sweep points reuse it.

    Memoised only while ``calibration.parent_key`` is set, i.e. while a step sees the parent's exact
    weights (the first step of each child); after another step changed them it is computed afresh.
    The key is the parent's fingerprint and the memo lives on this calibration, so no weight is
    read or copied to build the key.
    """
    key = None if calibration is None or calibration.parent_key is None else (what, calibration.parent_key)
    if key is None:
        return compute()
    if key not in calibration.memo:
        calibration.memo[key] = compute()
    return calibration.memo[key]


def require_ids(calibration: Calibration | None, method: str, hint: str = "") -> torch.Tensor:
    """The calibration token ids, or a FlipcheckError saying `method` needs them (plus `hint`)."""
    ids = None if calibration is None else calibration.input_ids
    if ids is None:
        raise FlipcheckError(f"{method} needs calibration data, but none was prepared" + (f"; {hint}" if hint else ""))
    return ids
