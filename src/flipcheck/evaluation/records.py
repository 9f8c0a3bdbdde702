"""What one model produced for one lm-eval request (:class:`Record`), and how requests are keyed."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

InstanceKey = tuple[str, int, int]  # (instance.task_name, instance.doc_id, instance.idx)



@dataclass(eq=False)
class Record:
    """What one model produced for one lm-eval ``Instance``.

    For ``loglikelihood`` and ``loglikelihood_rolling`` every array runs over the scored continuation
    positions (``n_tokens`` rows). For ``generate_until``, ``token_ids``/``topk_*`` run along this
    model's own greedy output (so the record can serve as a reference later), while ``kl`` and
    ``top1_agree`` run along the REFERENCE's output, teacher-forced through both models.

    Every option of a question is predicted at its context's last position (and options sharing
    leading tokens share more): ``kl``, ``top1_agree`` and ``nonfinite`` cover only the positions this
    record is the first of its document to score (in instance order), so a document's records
    together count each distinct position once. KL is NaN and agreement False where either model's
    logits were not finite.
    """

    kind: str  # "loglikelihood" | "loglikelihood_rolling" | "generate_until"
    args_hash: str  # sha256 of repr(instance.args): detects stale reuse
    ll: float | None = None  # summed log-prob of the continuation
    is_greedy: bool | None = None  # every continuation token is this model's argmax
    n_tokens: int = 0  # scored positions
    text: str | None = None  # generate_until output, as lm-eval receives it
    topk_logp: np.ndarray | None = None  # (n_tokens, K) float32: this model's top-K log-probs per position
    topk_ids: np.ndarray | None = None  # (n_tokens, K) int32
    kl: np.ndarray | None = None  # (m,) float32: KL(reference || this model) per distinct scored position
    top1_agree: np.ndarray | None = None  # (m,) bool: argmax reference == argmax this model, same positions
    token_ids: np.ndarray | None = None  # (n_tokens,) int32: the scored tokens (continuation / own output)
    nonfinite: int = 0  # distinct scored positions where this model's logits held NaN/inf
    tail_logp: np.ndarray | None = None  # (n_tokens, S) float32: log-probs of S tokens sampled outside the top-K
    tail_ids: np.ndarray | None = None  # (n_tokens, S) int32 (records made without a reference)
    kl_rev: np.ndarray | None = None  # (m,) float32: KL(this model || reference), the positions of `kl`
    tf_miss: np.ndarray | None = None  # generate_until (m,) bool: this model's argmax != the reference's token
    finish: str | None = None  # generate_until: "stop" (EOS / stop sequence) or "length" (the token limit)
    samples_ids: np.ndarray | None = None  # generate_until with --samples N: samples 1..N-1's tokens, concatenated
    samples_lens: list[int] | None = None  # their lengths (sample 0 is token_ids)


def instance_key(instance: Instance) -> InstanceKey:
    return (instance.task_name, instance.doc_id, instance.idx)


def args_hash(args: Any) -> str:
    """sha256 of ``repr(instance.args)``."""
    return hashlib.sha256(repr(args).encode("utf-8")).hexdigest()


def nonfinite_by_task(records: Mapping[InstanceKey, Record]) -> dict[str, int]:
    """Distinct scored positions with NaN/inf logits per task (0 for tasks without any)."""
    out: dict[str, int] = {}
    for (task, _doc, _idx), rec in records.items():
        out[task] = out.get(task, 0) + int(getattr(rec, "nonfinite", 0) or 0)
    return out
