"""The scoring seam: one interface for every engine that turns token ids into next-token distributions.

flipcheck's evaluator asks three things of a model, whatever runs it:

- **options and teacher forcing** (lm-eval ``loglikelihood``, the generative tasks' KL along the
  parent's output): for rows of token ids, the log-probabilities over the vocabulary at chosen
  positions (:meth:`PositionRunner.selected` / :meth:`PositionRunner.logits_of`, the interface
  :func:`flipcheck.evaluation.forward.score_items` drives);
- **rolling text windows** (``--text``, perplexity tasks): the log-probabilities at the scored
  positions of equal-length windows (:meth:`Engine.window_log_probs`);
- **generation** (``generate_until``): greedy continuations with lm-eval's stop sequences
  (:meth:`Engine.generate`).

From those the evaluator derives, per scored position, what every figure needs: the actual
token's log-probability, the argmax, the top-K plus sampled tail (or the whole distribution), and a
non-finite flag (:mod:`flipcheck.evaluation.forward`). An engine that returns the whole
distribution (transformers, llama.cpp, vLLM with ``max_logprobs=-1``) gives exact KL: it has the
``exact`` capability (:attr:`Engine.capabilities`).

An engine's :meth:`Engine.identity` (name, version, dtype, and the settings that change numbers) is
part of every cache key and shown per model in every report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

# What an engine can do (:attr:`Engine.capabilities`):
EXACT = "exact"  # the whole next-token distribution at every position (exact vocabulary KL)
TOPK = "topk"  # only its top-K log-probs per position (the vocabulary KL is a lower bound)
NEEDS_TARGETS = "needs_targets"  # a position's log-prob of a token is known only where the prompt holds it
GENERATES = "generates"  # greedy continuations (generate_until)
REMOTE = "remote"  # runs elsewhere (a server): no weights here; encoded with the parent's tokenizer


@dataclass(frozen=True)
class FloorPartner:
    """Another way to run the same weights, for ``--engine-floor``: the registered engine `engine`
    opened with `options`; `write_f32`: on a float32 GGUF written from the in-memory parent."""

    engine: str
    key: str  # cache-key suffix of the floor row
    label: str  # the row's name in the report
    options: dict[str, Any] = field(default_factory=dict)
    write_f32: bool = False


class Engine(ABC):
    """A model behind one scoring engine, registered by name (:func:`~flipcheck.evaluation.engines.
    register_engine`). An engine class says what it is for a source before anything loads
    (:meth:`identity_for`), opens one (:meth:`open`), whether it is a source's default
    (:meth:`default_for`), what it can do (:attr:`capabilities`) and which engines give its floor
    (:meth:`floor_partners`); an instance scores."""

    name: str = "?"
    aliases: tuple[str, ...] = ()
    rank: int = 100  # where it is listed among the engines (and asked first to claim a source)
    capabilities: frozenset[str] = frozenset({EXACT, GENERATES})

    @property
    def exact(self) -> bool:
        """The whole next-token distribution at every position (exact KL)."""
        return EXACT in self.capabilities

    @classmethod
    def default_for(cls, source) -> bool:
        """Whether this engine scores `source` when none is asked for."""
        return False

    @classmethod
    def identity_for(cls, source, dtype: torch.dtype) -> dict[str, Any]:
        """What this engine will be for `source`, known before loading anything (it enters the cache
        keys): name, version, dtype and the settings that change numbers."""
        raise NotImplementedError(f"engine {cls.name!r} cannot name itself before loading")

    @classmethod
    def open(cls, source, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
             **options: Any) -> Engine:
        """Open a resolved :class:`~flipcheck.models.ModelSource` with this engine."""
        raise NotImplementedError(f"engine {cls.name!r} does not open model sources")

    def floor_partners(self, source) -> list[FloorPartner]:
        """The rows of ``--engine-floor`` for a parent (from `source`) on this engine (none: no floor)."""
        return []

    @property
    @abstractmethod
    def vocab(self) -> int:
        """Width of a distribution (the logits' last dimension)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """``{"name", "version", "dtype", **settings}``: what changes this engine's numbers."""

    @abstractmethod
    def runner(self):
        """The object :func:`flipcheck.evaluation.forward.score_items` drives (ModelRunner's interface:
        ``device``, ``vocab``, ``pack_ok``, ``window``, ``hidden_ok``, ``inputs``, ``selected``,
        ``logits_of``)."""

    @abstractmethod
    def window_log_probs(self, ids: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch of equal-length windows ``ids`` (B, L): float32 logits at positions
        ``start..stop-1`` of every window, as (B * (stop - start), V), rows in window order, and
        the device they are on."""

    @abstractmethod
    def generate(self, ctxs: list[list[int]], max_new: int, stop_fn, eos_ids: set[int]) -> list[list[int]]:
        """Greedy continuation of each context: new token ids, at most `max_new`, ending at the first
        eos token (kept) or where ``stop_fn(tokens)`` says a stop sequence is complete."""

    def max_length(self) -> int | None:
        """The longest sequence this engine takes (None: ask the model config/tokenizer)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the engine holds (a server connection, native memory)."""

    def label(self) -> str:
        ident = self.identity()
        return " ".join(str(x) for x in (ident.get("name"), ident.get("version"), ident.get("dtype")) if x)


class LoadedEngine(Engine):
    """An engine that knows its width, identity, length limit and runner once loaded (llama.cpp, vLLM):
    subclasses set ``_vocab``, ``_identity``, ``_max_length`` and ``_runner`` in ``__init__``."""

    _vocab: int
    _identity: dict[str, Any]
    _max_length: int | None = None
    _runner: Any = None

    @property
    def vocab(self) -> int:
        return self._vocab

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def max_length(self) -> int | None:
        return self._max_length

    def runner(self):
        return self._runner


class ExternalRunner:
    """ModelRunner's interface for an engine that runs whole token sequences and returns logits per
    position (llama.cpp, vLLM): one sequence per row (no packing), logits gathered at the scored
    positions. `run(tokens, positions)` returns float32 logits (len(positions), V)."""

    pack_ok = False
    hidden_ok = False
    window = None
    model = None
    prefix_cache = True  # rows in token order: the engine reuses the previous sequence's shared prefix

    def __init__(self, engine: Engine, run) -> None:
        self.engine = engine
        self.device = torch.device("cpu")
        self.vocab = engine.vocab
        self.dtype = torch.float32
        self._run = run

    def inputs(self, rows, pad_id: int, window) -> dict[str, Any]:
        return {"rows": rows}

    def selected(self, inputs: dict[str, Any], rows_idx: torch.Tensor, pos_idx: torch.Tensor) -> torch.Tensor:
        rows = inputs["rows"]
        out = torch.empty((len(rows_idx), self.vocab), dtype=torch.float32)
        r_list, p_list = rows_idx.tolist(), pos_idx.tolist()
        by_row: dict[int, list[int]] = {}
        for j, r in enumerate(r_list):
            by_row.setdefault(r, []).append(j)
        for r, js in by_row.items():
            positions = [p_list[j] for j in js]
            out[js] = self._run(list(rows[r].tokens), positions)
        return out

    def logits_of(self, selected: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return selected[s:e]


def cut_at_stop(tokens: list[int], stop_fn, eos_ids: set[int]) -> list[int]:
    """A greedy continuation up to its first eos token (kept) or completed stop sequence."""
    new: list[int] = []
    for t in tokens:
        new.append(int(t))
        if t in eos_ids or stop_fn(new):
            break
    return new
