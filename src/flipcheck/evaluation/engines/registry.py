"""The engine registry: ``register_engine(EngineClass)`` and the engine is there for every command.

An engine is one module holding an :class:`~flipcheck.evaluation.engines.base.Engine` subclass and one
registration. The registry answers the questions the rest of flipcheck asks by name: which engines a
user may choose (``--engine``; aliases included), which one scores a source by default, what an
engine will be for a source before it loads (its identity enters the cache keys), and how to open one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines.base import Engine

log = logging.getLogger(__name__)

_ENGINES: dict[str, type[Engine]] = {}
_ALIASES: dict[str, str] = {}
_SELECTABLE: list[str] = []


def register_engine(cls: type[Engine], *, selectable: bool = True) -> type[Engine]:
    """Make `cls` an engine under ``cls.name`` and ``cls.aliases``; `selectable`: a value of ``--engine``
    (a served model is reached by its URL instead). Registering a name again replaces it."""
    if not cls.name or cls.name == "?":
        raise ValueError(f"{cls.__name__} has no engine name")
    _ENGINES[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    if selectable and cls.name not in _SELECTABLE:
        _SELECTABLE.append(cls.name)
    return cls


def engine_names() -> tuple[str, ...]:
    """The engines a user may ask for, by their classes' ``rank``, then in registration order."""
    return tuple(sorted(_SELECTABLE, key=lambda n: (_ENGINES[n].rank, _SELECTABLE.index(n))))


def registered_engines() -> tuple[str, ...]:
    """Every registered engine, those reached otherwise than by ``--engine`` (a served model) included."""
    return tuple(_ENGINES)


def engine_class(name: str) -> type[Engine]:
    canon = _ALIASES.get(name, name)
    if canon not in _ENGINES:
        raise FlipcheckError(f"engine {name!r}: allowed are auto, {', '.join(engine_names())}")
    return _ENGINES[canon]


def check_engine(name: str | None) -> str | None:
    """The canonical engine name (None: the default for each model); an unknown name fails in one line."""
    if name is None or name == "auto":
        return None
    canon = _ALIASES.get(name, name)
    if canon not in _SELECTABLE:
        raise FlipcheckError(f"engine {name!r}: allowed are auto, {', '.join(engine_names())}")
    return canon


def default_engine(source) -> str:
    """The first engine that claims `source` (llama.cpp for a GGUF file where it is installed), else
    transformers."""
    for name in engine_names():
        if _ENGINES[name].default_for(source):
            return name
    return "transformers"


def engine_identity(source, name: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """What the engine asked for (None: the source's default) will be for `source`, before loading."""
    return engine_class(check_engine(name) or default_engine(source)).identity_for(source, dtype)


def open_engine(source, name: str | None, *, device: str | None = None, dtype: str | None = None,
                trust_remote_code: bool = False, **options: Any) -> Engine:
    """Open a resolved :class:`~flipcheck.models.ModelSource` with engine `name` (None: its default);
    `options` go to that engine (llama.cpp's ``layout``)."""
    cls = engine_class(check_engine(name) or default_engine(source))
    return cls.open(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **options)
