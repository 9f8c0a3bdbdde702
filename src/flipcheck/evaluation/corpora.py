"""The text corpora of one evaluation: what :class:`~flipcheck.evaluation.runner.Evaluator` scores for
``--text`` and perplexity tasks (the windows and figures are :mod:`flipcheck.evaluation.corpus`).

Each corpus is loaded once (a task's documents when first needed), cut into windows once with the
parent's tokenizer, and its parent side and every child's per-token results are cached like a task's
(keys: the models' identities, the corpus content, ``ctx``, scoring, top-K and tail samples).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from flipcheck.evaluation.corpus import (
    CORPUS_VERSION,
    iter_windows,
    score_child,
    score_parent,
    summarize,
    task_corpus,
    text_corpus,
    windows,
)
from flipcheck.evaluation.kl import DEFAULT_TAIL_SAMPLES

if TYPE_CHECKING:
    from flipcheck.evaluation.evaluator_api import EvaluatorView as Evaluator
    from flipcheck.evaluation.model_ref import ModelRef

log = logging.getLogger(__name__)

CHUNK_WINDOWS = 64  # windows per cached chunk (32k tokens at ctx 512): the unit of memory and of resuming


class Corpora:
    """The corpora of `ev`: perplexity tasks by name (`rolling`) and ``--text`` sources (`texts`, read now,
    so a missing file or an unknown dataset fails before any model loads). Iterates over the names."""

    def __init__(self, ev: Evaluator, rolling: list[str], texts: list[str]):
        self.ev = ev
        self._by_name: dict[str, Any] = dict.fromkeys(rolling)  # name -> Corpus; a task's documents on first need
        for spec in texts:
            c = text_corpus(spec)
            self._by_name[c.name] = c

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

    def chunks(self, name: str) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(index of the first window, windows) per chunk of ``CHUNK_WINDOWS`` windows, tokenized as the
        chunks are needed: memory holds one chunk of windows, not the corpus's tokens."""
        self.ev.parent.ensure_identity(self.ev.settings)
        s = self.ev.settings
        if s.limit is not None and s.limit < 1:  # a fraction of the windows needs their count first
            stream = iter(windows(self.ev.parent.tokenizer, self.corpus(name), s.ctx, s.limit))
        else:
            stream = iter_windows(self.ev.parent.tokenizer, self.corpus(name), s.ctx, s.limit)
        first = 0
        while True:
            part = list(itertools.islice(stream, CHUNK_WINDOWS))
            if not part:
                return
            yield first, part
            first += len(part)

    def _chunk_fields(self, name: str, first: int, wins: list[np.ndarray]) -> dict[str, Any]:
        return {**self._fields(name), "chunk": first, "windows": len(wins)}

    def _parent_chunk(self, name: str, first: int, wins: list[np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
        """The parent's side of one chunk (cached): exact NLL and argmax, top-K and tail samples; and
        whether it was scored now."""
        key = self.ev.parent_key(self._chunk_fields(name, first, wins))
        hit = self.ev.cache.get_arrays(key)
        if hit is not None:
            return hit, False
        self.ev.parent.ensure_loaded(self.ev.settings)
        arrays = score_parent(self.ev.parent.model, wins, scoring=self.ev.settings.scoring, topk=self.ev.settings.topk,
                              batch_size=self.ev.settings.batch_size, first_window=first)
        self.ev.cache.put_arrays(key, arrays, {"corpus": name, "parent": self.ev.parent.source, "chunk": first})
        return arrays, True

    def score_parent(self, name: str) -> None:
        """The parent's side of every chunk of one corpus, into the cache (one parent pass if any was missing)."""
        scored = False
        for first, wins in self.chunks(name):
            scored |= self._parent_chunk(name, first, wins)[1]
        self.ev.parent_passes += int(scored)

    def child_tokens(self, child: ModelRef, name: str, method: str, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Per scored token of one child on one corpus, chunk by chunk, each chunk cached (per KL method):
        an interrupted corpus resumes at its first unfinished chunk."""
        parts, done, parent_pass = [], 0, False
        for first, wins in self.chunks(name):
            key = self.ev.child_key(child, self._chunk_fields(name, first, wins), method)
            hit = self.ev.cache.get_arrays(key)
            if hit is not None:
                parts.append(hit)
                done += 1
                continue
            child.ensure_loaded(self.ev.settings)
            bs = batch_size or self.ev.settings.batch_size
            if method == "exact":
                self.ev.parent.ensure_loaded(self.ev.settings)
                parent_pass = True
                tokens = score_child(child.model, wins, scoring=self.ev.settings.scoring, parent_model=self.ev.parent.model,
                                     batch_size=bs, first_window=first)
            else:
                parent, scored = self._parent_chunk(name, first, wins)
                parent_pass |= scored
                tokens = score_child(child.model, wins, scoring=self.ev.settings.scoring, parent=parent, batch_size=bs,
                                     first_window=first)
            self.ev.cache.put_arrays(key, tokens, {"corpus": name, "child": child.source, "kl": method, "chunk": first})
            parts.append(tokens)
        self.ev.parent_passes += int(parent_pass)
        if done and done == len(parts):
            log.info("%s / %s: finished in an earlier run (cache)", child.name, name)
        elif done:
            log.info("%s / %s: resumed after %d cached chunk(s)", child.name, name, done)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

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
