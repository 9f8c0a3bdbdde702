"""A model to evaluate (:class:`ModelRef`): its source, identity (fingerprint, tokenizer, engine)
and lazily its weights behind an engine; children and served models as refs."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines import as_engine, engine_identity, open_engine
from flipcheck.evaluation.engines.base import REMOTE, Engine
from flipcheck.evaluation.engines.served import ServedEngine
from flipcheck.evaluation.engines.transformers import TransformersEngine
from flipcheck.evaluation.settings import EvalSettings
from flipcheck.models import (
    ModelSource,
    fingerprint,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)

log = logging.getLogger(__name__)


@dataclass
class ModelRef:
    """A model to evaluate: its resolved source (identity), and lazily its tokenizer and weights.

    `source` is what the user wrote (hub id or folder) or a :class:`ModelSource`; it is resolved
    once, and fingerprint, tokenizer and weights all come from that one resolution.
    """

    name: str
    source: str | ModelSource | None
    model: Any = None  # an Engine once loaded (a torch model given here is wrapped in the transformers engine)
    tokenizer: Any = None
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # method, settings, strength, compression reports
    resolved: ModelSource | None = field(default=None, repr=False)
    engine: str | None = None  # the scoring engine asked for (None: the source's default)
    _identity: tuple[Any, dict[str, Any]] | None = field(default=None, repr=False)
    _engine_identity: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.source, ModelSource):
            self.resolved, self.source = self.source, self.source.spec

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "model" and value is not None:
            value = as_engine(value)  # weights are always behind an engine
        object.__setattr__(self, name, value)

    @property
    def torch_model(self) -> torch.nn.Module | None:
        """The torch model behind a transformers engine (compressors and the noise floor change its
        weights); None for weights elsewhere (llama.cpp, vLLM, a server) or not loaded."""
        return self.model.model if isinstance(self.model, TransformersEngine) else None

    def src(self) -> ModelSource:
        if self.resolved is None:
            if self.source is None:
                raise FlipcheckError(f"model {self.name!r} has neither weights nor a source")
            self.resolved = resolve_source(self.source)
        return self.resolved

    def ensure_identity(self, settings: EvalSettings) -> None:
        """Tokenizer, fingerprint and engine identity, without loading the weights."""
        if self.tokenizer is None and not self.served:  # a served model is encoded with the parent's tokenizer
            self.tokenizer = load_tokenizer(self.src(), trust_remote_code=settings.trust_remote_code)
        if self.fingerprint is None:
            self.fingerprint = cached_fingerprint(self.resolved or self.source, self.torch_model)
        self.engine_identity(settings)

    @property
    def served(self) -> bool:
        """An already served model (no weights here; the parent's tokenizer encodes for it)."""
        return self.source is None and isinstance(self.model, Engine) and REMOTE in self.model.capabilities

    def ensure_loaded(self, settings: EvalSettings) -> None:
        """The weights, behind the engine asked for: a torch model (transformers) or an engine object."""
        if self.model is None:
            log.info("loading %s", self.source)
            eng = open_engine(self.src(), self.engine, device=settings.device, dtype=settings.dtype,
                              trust_remote_code=settings.trust_remote_code)
            self.model = eng
        self.ensure_identity(settings)

    def engine_identity(self, settings: EvalSettings | None = None) -> dict[str, Any]:
        """The scoring engine's identity (name, version, dtype, settings that change numbers), known
        before any weight loads; part of every cache key of this model."""
        if self._engine_identity is None:
            if self.source is None and self.model is not None:  # in memory: what it is
                self._engine_identity = as_engine(self.model).identity()
            else:
                dev = resolve_device(settings.device if settings else None)
                self._engine_identity = engine_identity(self.src(), self.engine,
                                                        resolve_dtype(settings.dtype if settings else None, dev))
        return self._engine_identity

    def identity_key(self) -> dict[str, Any]:
        """What besides the fingerprint changes this model's scores: tokenizer, config (max length)."""
        if self._identity is None or self._identity[0] is not self.tokenizer:
            self._identity = (self.tokenizer, {
                "tokenizer": tokenizer_key(self.tokenizer) if self.tokenizer is not None else None,
                "config": self.src().config_hash() if self.source is not None else None,
                "scorer": self.engine_identity(),
            })
        return self._identity[1]

    def release(self) -> None:
        """Drop the weights (a sweep keeps one child in memory at a time)."""
        if self.source is not None:
            if self.model is not None:
                self.model.close()
            self.model = None


def cached_fingerprint(source: str | ModelSource | None, model: torch.nn.Module | None = None) -> str:
    """A model's fingerprint: from its resolved source (never loading weights), or the in-memory weights."""
    if source is not None:
        return resolve_source(source).fingerprint
    if model is None:
        raise FlipcheckError("cannot fingerprint a model with neither a source nor weights")
    return fingerprint(model)


def tokenizer_hash(tok) -> str:
    """The vocabulary (token -> id): parent and child must share it for flips and KL to mean anything."""
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


_TOKENIZER_PROBE = "Question: The  café's answer is 42.\nAnswer:"


def tokenizer_key(tok) -> str:
    """Everything about a tokenizer that changes scores: vocabulary, merges, normalisation, added and
    special tokens, BOS/EOS handling (the fast tokenizer's full pipeline without its padding state),
    the length limit, and how a probe text encodes."""
    backend = getattr(tok, "backend_tokenizer", None)
    parts: dict[str, Any] = {"vocab": tokenizer_hash(tok)}
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        parts["pipeline"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    parts["special"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items()) if k != "pad_token"}
    parts["added"] = sorted((i, repr(t)) for i, t in getattr(tok, "added_tokens_decoder", {}).items())
    for attr in ("add_bos_token", "add_eos_token", "model_max_length"):
        parts[attr] = getattr(tok, attr, None)
    parts["probe"] = tok(_TOKENIZER_PROBE)["input_ids"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _vocab_width(ref: ModelRef) -> int:
    """The width of `ref`'s distributions without loading it: the config's vocab_size (the tokenizer's
    length where no config is there)."""
    if ref.torch_model is not None:
        return ref.model.vocab
    try:
        src = ref.src()
        if not src.gguf:
            cfg = json.loads((src.local_folder(weights=False) / "config.json").read_text())
            size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
            if size:
                return int(size)
    except (OSError, ValueError, FlipcheckError):
        pass
    return len(ref.tokenizer)


def served_ref(url: str, model: str, settings: EvalSettings, tokenizer_from: ModelSource | None = None) -> ModelRef:
    """A model that is already served (OpenAI-compatible /v1/completions); nothing is contacted yet. A
    served child is encoded with the parent's tokenizer; a served parent with `tokenizer_from`'s (the
    PARENT the user named, whose config also gives the vocabulary width)."""
    eng = ServedEngine(url, model, topk=settings.topk)
    ref = ModelRef(name="parent" if tokenizer_from else model, source=None, model=eng,
                   fingerprint=eng.fingerprint(), info={"served": eng.url})
    if tokenizer_from is not None:
        local = ModelRef("tokenizer", tokenizer_from)
        local.tokenizer = ref.tokenizer = load_tokenizer(tokenizer_from, trust_remote_code=settings.trust_remote_code)
        eng.bind(_vocab_width(local))
    return ref


def child_ref(source: str | ModelSource, name: str | None = None, engine: str | None = None) -> ModelRef:
    """A child (folder or hub id); method and settings from its flipcheck.json when flipcheck made it."""
    ms = resolve_source(source)
    prov = ms.provenance
    info: dict[str, Any] = {}
    if prov:
        steps = prov.get("recipe") or []
        info["method"] = "+".join(s.get("method", "?") for s in steps) or None
        info["settings"] = steps[0].get("settings") if len(steps) == 1 else steps
        info["compression"] = prov.get("reports", [])
        info["strength"] = prov.get("strength")
    if ms.gguf:
        info.setdefault("method", "gguf")  # a GGUF flipcheck did not make
        default = Path(ms.gguf).stem if not prov else Path(ms.folder).name  # type: ignore[arg-type]
    else:
        default = ms.hub_id or Path(ms.spec).name
    return ModelRef(name=name or default, source=ms, info=info, engine=engine)


def parent_source_for(child: str | ModelSource) -> str:
    """The parent a child's flipcheck.json names (a hub id, or a folder)."""
    ms = resolve_source(child)
    prov = ms.provenance
    if not prov or not prov.get("parent"):
        raise FlipcheckError(
            f"{ms.spec!r} has no flipcheck.json naming its parent; pass the parent explicitly: flipcheck eval PARENT CHILD"
        )
    return str(prov["parent"])
