"""Scoring engines behind one interface (:class:`~flipcheck.evaluation.engines.base.Engine`), each
registered by name (:mod:`.registry`):

- ``transformers`` (default for folders and hub models): the model in this process;
- ``llama.cpp`` (default for GGUF files when llama-cpp-python is installed): llama.cpp's kernels;
  without it a GGUF is dequantized by transformers and labelled so;
- ``vllm``: a folder or hub model run by ``vllm.LLM`` in this process;
- ``served``: a model already served behind an OpenAI-compatible ``/v1/completions``
  (:class:`~flipcheck.evaluation.engines.served.ServedEngine`, ``--child-url``; its source is a URL).

:func:`as_engine` wraps an in-memory ``torch.nn.Module`` (what tests and the noise floor hand
over); :func:`open_engine` opens a resolved model source with the engine asked for. A new engine is
one module and one :func:`register_engine` call.
"""

from __future__ import annotations

from typing import Any

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines import (  # noqa: F401 - registered at import
    llamacpp,
    served,
    transformers,  # noqa: I001 - registration order: transformers first
    vllm,
)
from flipcheck.evaluation.engines.base import Engine, ExternalRunner, FloorPartner
from flipcheck.evaluation.engines.registry import (
    check_engine,
    default_engine,
    engine_class,
    engine_identity,
    engine_names,
    open_engine,
    register_engine,
    registered_engines,
)

__all__ = ["Engine", "ExternalRunner", "FloorPartner", "as_engine", "check_engine", "default_engine",
           "engine_class", "engine_identity", "engine_names", "open_engine", "register_engine",
           "registered_engines"]


def as_engine(model: Any) -> Engine:
    """An :class:`Engine` for `model`: itself, or a transformers engine around a ``torch.nn.Module``."""
    if isinstance(model, Engine):
        return model
    if isinstance(model, torch.nn.Module):
        return transformers.TransformersEngine(model)
    raise FlipcheckError(f"cannot score a {type(model).__name__}: pass a torch model or a flipcheck engine")
