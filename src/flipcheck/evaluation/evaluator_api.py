"""The evaluator as its helpers see it (:class:`EvaluatorView`): the text corpora (:mod:`.corpora`) and
the floors (:mod:`.floor`) are handed the :class:`~flipcheck.evaluation.runner.Evaluator` that runs them
and use only this much of it, so they depend on this description, not on the runner module."""

from __future__ import annotations

from typing import Any, Protocol

from flipcheck.evaluation.cache import ResultCache
from flipcheck.evaluation.model_ref import ModelRef
from flipcheck.evaluation.settings import EvalSettings


class EvaluatorView(Protocol):
    parent: ModelRef
    settings: EvalSettings
    cache: ResultCache
    parent_passes: int  # model passes of the parent made so far (counted by the helpers too)

    def parent_key(self, scope: dict[str, Any]) -> str:
        """The cache key of the parent's results over `scope`."""

    def child_key(self, child: ModelRef, scope: dict[str, Any], method: str | None = None) -> str:
        """The cache key of `child`'s results over `scope` (KL `method` included)."""

    def evaluate_child(self, child: ModelRef, *, batch_size: int | None = None, kl: str | None = None) -> tuple[dict, Any]:
        """`child` scored against the parent: its report entry and sample rows."""
