"""One question scored by parent and child: :class:`SampleRow`, one line of samples.jsonl (built by
:mod:`.samples`, sliced by :mod:`.slices`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass
class SampleRow:
    """One question scored by the parent P and the child C (one line of samples.jsonl)."""

    task: str
    doc_id: int
    gold: Any  # the task's target: option index for multiple choice, reference text for generation
    pred_P: Any  # option index (multiple choice), answer text (generation) or is_greedy (loglikelihood)
    pred_C: Any
    correct_P: bool
    correct_C: bool
    kl_options: float | None  # KL(p_P ‖ p_C) over this question's options; None if not multiple choice
    kl_vocab: float | None  # mean vocabulary KL over this question's scored tokens; None if not measured
    top1_agree: float | None  # fraction of this question's scored tokens where argmax P == argmax C
    margin_P: float | None  # P's best minus second-best option probability
    output_P: str | None = None  # raw generations (generative tasks)
    output_C: str | None = None
    kind: str = "multiple_choice"
    ll_P: list[float] | None = None  # option log-likelihoods
    ll_C: list[float] | None = None
    choices: list[str] | None = None  # option texts (continuations without lm-eval's target delimiter)
    pred_norm_P: int | None = None  # length-normalised prediction, when the task reports acc_norm
    pred_norm_C: int | None = None
    correct_norm_P: bool | None = None
    correct_norm_C: bool | None = None
    n_tokens: int | None = None  # scored tokens behind kl_vocab / top1_agree
    question: str | None = None  # the end of the prompt, for reading the flipped questions
    metric: str | None = None  # what correctness was read from: acc, exact_match, ...
    filter: str | None = None  # the lm-eval filter the answers came through (generative: strict-match, ...)
    margin_norm_P: float | None = None  # P's top margin over the length-normalised option scores
    headline: str | None = None  # "acc_norm" when the headline figures use the length-normalised answers
    kl_options_rev: float | None = None  # KL(p_C ‖ p_P) over the options, the reverse direction
    kl_vocab_rev: float | None = None  # mean KL(C ‖ P) over the vocabulary at this question's scored tokens
    category: str | None = None  # the doc's own `category` (else `subject`) field, when it has one
    prompt_chars: int | None = None  # length of the prompt (the first request's context) in characters
    first_diff_char: int | None = None  # generative: first character index where output_P and output_C differ
    generation: dict[str, Any] | None = None  # generative: trajectory figures (evaluation/generations.py)

    def view(self) -> tuple[bool, bool, Any, Any, float | None]:
        """(correct_P, correct_C, pred_P, pred_C, margin_P) under the row's headline metric."""
        if self.headline == "acc_norm" and self.correct_norm_P is not None and self.correct_norm_C is not None:
            return self.correct_norm_P, self.correct_norm_C, self.pred_norm_P, self.pred_norm_C, self.margin_norm_P
        return self.correct_P, self.correct_C, self.pred_P, self.pred_C, self.margin_P

    @property
    def flipped(self) -> bool:
        v = self.view()
        return v[0] != v[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleRow:
        """A row from a samples.jsonl line; unknown keys (such as ``child``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
        """The per-token vocabulary KL, top-1 agreement and reverse KL behind kl_vocab (not serialised)."""
        return getattr(self, "_tokens", None)
