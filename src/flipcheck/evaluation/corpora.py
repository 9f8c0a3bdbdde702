"""The text corpora of one evaluation: what :class:`~flipcheck.evaluation.runner.Evaluator` scores for
``--text`` and perplexity tasks (the windows and figures are :mod:`flipcheck.evaluation.corpus`).

Each corpus is loaded once (a task's documents when first needed), cut into windows once with the
parent's tokenizer, and its parent side and every child's per-token results are cached like a task's
(keys: the models' identities, the corpus content, ``ctx``, scoring, top-K and tail samples).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from flipcheck.evaluation.corpus import (
    CORPUS_VERSION,
    score_child,
    score_parent,
    summarize,
    task_corpus,
    text_corpus,
    windows,
)
from flipcheck.evaluation.kl import DEFAULT_TAIL_SAMPLES

if TYPE_CHECKING:
    from flipcheck.evaluation.runner import Evaluator, ModelRef

log = logging.getLogger(__name__)


class Corpora:
    """The corpora of `ev`: perplexity tasks by name (`rolling`) and ``--text`` sources (`texts`, read now,
    so a missing file or an unknown dataset fails before any model loads). Iterates over the names."""

    def __init__(self, ev: Evaluator, rolling: list[str], texts: list[str]):
        self.ev = ev
        self._by_name: dict[str, Any] = dict.fromkeys(rolling)  # name -> Corpus; a task's documents on first need
        for spec in texts:
            c = text_corpus(spec)
            self._by_name[c.name] = c
        self._windows: dict[str, list] = {}

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def corpus(self, name: str):
        if self._by_name[name] is None:
            self._by_name[name] = task_corpus(name, self.ev.settings.include_path)
        return self._by_name[name]

    def _fields(self, name: str) -> dict[str, Any]:
        s = self.ev.settings
        return {"corpus": name, "content": self.corpus(name).content_hash(), "ctx": s.ctx, "scoring": s.scoring,
                "tail": DEFAULT_TAIL_SAMPLES, "corpus_version": CORPUS_VERSION}  # limit, top-K: in the evaluator's

    def windows_of(self, name: str) -> list:
        if name not in self._windows:
            self.ev.parent.ensure_identity(self.ev.settings)
            self._windows[name] = windows(self.ev.parent.tokenizer, self.corpus(name), self.ev.settings.ctx, self.ev.settings.limit)
        return self._windows[name]

    def parent_side(self, name: str) -> dict[str, np.ndarray]:
        """The parent's side of one corpus (cached): exact NLL and argmax, top-K and tail samples."""
        self.ev.parent.ensure_identity(self.ev.settings)
        key = self.ev.parent_key(self._fields(name))
        hit = self.ev.cache.get_arrays(key)
        if hit is not None:
            return hit
        self.ev.parent.ensure_loaded(self.ev.settings)
        arrays = score_parent(self.ev.parent.model, self.windows_of(name), scoring=self.ev.settings.scoring,
                              topk=self.ev.settings.topk, batch_size=self.ev.settings.batch_size)
        self.ev.parent_passes += 1
        self.ev.cache.put_arrays(key, arrays, {"corpus": name, "parent": self.ev.parent.source})
        return arrays

    def child_tokens(self, child: ModelRef, name: str, method: str, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Per scored token of one child on one corpus (cached per KL method)."""
        key = self.ev.child_key(child, self._fields(name), method)
        hit = self.ev.cache.get_arrays(key)
        if hit is not None:
            log.info("%s / %s: finished in an earlier run (cache)", child.name, name)
            return hit
        wins = self.windows_of(name)
        child.ensure_loaded(self.ev.settings)
        if method == "exact":
            self.ev.parent.ensure_loaded(self.ev.settings)
            self.ev.parent_passes += 1
            tokens = score_child(child.model, wins, scoring=self.ev.settings.scoring, parent_model=self.ev.parent.model,
                                 batch_size=batch_size or self.ev.settings.batch_size)
        else:
            tokens = score_child(child.model, wins, scoring=self.ev.settings.scoring, parent=self.parent_side(name),
                                 batch_size=batch_size or self.ev.settings.batch_size)
        self.ev.cache.put_arrays(key, tokens, {"corpus": name, "child": child.source, "kl": method})
        return tokens

    def figures(self, child: ModelRef, method: str, batch_size: int | None = None) -> dict[str, dict]:
        """Per corpus, the figures of one child (see :func:`flipcheck.evaluation.corpus.summarize`)."""
        out = {}
        for name in self._by_name:
            fig = summarize(self.child_tokens(child, name, method, batch_size), n_boot=self.ev.settings.n_boot, seed=self.ev.settings.seed)
            if fig["nonfinite"]["child"] or fig["nonfinite"]["parent"]:
                log.warning("%s / %s: scored tokens with NaN/inf logits: parent %d, child %d", child.name, name,
                            fig["nonfinite"]["parent"], fig["nonfinite"]["child"])
            out[name] = {"source": self.corpus(name).source, **fig}
        return out
