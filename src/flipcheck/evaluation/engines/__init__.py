"""Scoring engines behind one interface (:class:`~flipcheck.evaluation.engines.base.Engine`).

- ``transformers`` (default for folders and hub models): the model in this process;
- ``llama.cpp`` (default for GGUF files when llama-cpp-python is installed): llama.cpp's kernels;
  without it a GGUF is dequantized by transformers and labelled so;
- ``vllm``: a folder or hub model run by ``vllm.LLM`` in this process;
- a model already served behind an OpenAI-compatible ``/v1/completions``
  (:class:`~flipcheck.evaluation.engines.served.ServedEngine`, ``--child-url``).

:func:`as_engine` wraps an in-memory ``torch.nn.Module`` (what tests and the noise floor hand
over); :func:`open_engine` opens a resolved model source with the engine asked for.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.engines.base import Engine, ExternalRunner
from flipcheck.models import load_model

log = logging.getLogger(__name__)

ENGINES = ("transformers", "llama.cpp", "vllm")
_ALIASES = {"hf": "transformers", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "gguf": "llama.cpp"}

__all__ = ["ENGINES", "Engine", "ExternalRunner", "as_engine", "check_engine", "default_engine", "open_engine"]


def check_engine(name: str | None) -> str | None:
    """The canonical engine name (None: the default for each model); an unknown name fails in one line."""
    if name is None or name == "auto":
        return None
    canon = _ALIASES.get(name, name)
    if canon not in ENGINES:
        raise FlipcheckError(f"engine {name!r}: allowed are auto, {', '.join(ENGINES)}")
    return canon


def as_engine(model: Any) -> Engine:
    """An :class:`Engine` for `model`: itself, or a transformers engine around a ``torch.nn.Module``."""
    if isinstance(model, Engine):
        return model
    if isinstance(model, torch.nn.Module):
        from flipcheck.evaluation.engines.transformers import TransformersEngine

        return TransformersEngine(model)
    raise FlipcheckError(f"cannot score a {type(model).__name__}: pass a torch model or a flipcheck engine")


def default_engine(source) -> str:
    """llama.cpp for a GGUF file when llama-cpp-python is installed, else transformers."""
    if getattr(source, "gguf", None):
        from flipcheck.evaluation.engines import llamacpp

        if llamacpp.available():
            return "llama.cpp"
        log.info("%s: llama-cpp-python is not installed; transformers dequantizes the GGUF (%s)",
                 source.spec, llamacpp.INSTALL_HINT)
    return "transformers"


def engine_identity(source, name: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """What an engine will be for `source`, known before loading anything (it enters the cache keys):
    name, version, dtype and the settings that change numbers."""
    name = check_engine(name) or default_engine(source)
    gguf = getattr(source, "gguf", None)
    if name == "llama.cpp":
        from flipcheck.evaluation.engines.llamacpp import llamacpp_identity, require

        require()  # without llama-cpp-python: one line naming the pip command
        return llamacpp_identity(source.gguf_path())
    if name == "vllm":
        from flipcheck.evaluation.engines.vllm import require, vllm_identity

        require()
        return vllm_identity(_vllm_folder(source, weights=False), str(dtype).replace("torch.", ""))
    import transformers

    ident: dict[str, Any] = {"name": "transformers", "version": transformers.__version__,
                             "dtype": str(dtype).replace("torch.", "")}
    if gguf:
        from flipcheck.evaluation.engines.llamacpp import gguf_file_type

        ident["dequantized_from"] = f"GGUF {gguf_file_type(source.gguf_path())}"
    return ident


def open_engine(source, name: str | None, *, device: str | None = None, dtype: str | None = None,
                trust_remote_code: bool = False, layout: str = "prefix") -> Engine:
    """Open a resolved :class:`~flipcheck.models.ModelSource` with engine `name` (None: its default);
    `layout`: llama.cpp's batch layout (:mod:`~flipcheck.evaluation.engines.llamacpp`)."""
    name = check_engine(name) or default_engine(source)
    gguf = getattr(source, "gguf", None)
    if name == "llama.cpp":
        if not gguf:
            raise FlipcheckError(
                f"{source.spec}: the llama.cpp engine scores GGUF files; make one with "
                "`flipcheck compress MODEL --method gguf --set type=F32` or pass a .gguf file"
            )
        from flipcheck.evaluation.engines.llamacpp import LlamaCppEngine

        n_gpu = -1 if device not in (None, "cpu") and torch.cuda.is_available() else 0
        return LlamaCppEngine(source.gguf_path(), n_gpu_layers=n_gpu, layout=layout)
    if name == "vllm":
        from flipcheck.evaluation.engines.vllm import VllmEngine
        from flipcheck.models import resolve_device, resolve_dtype

        dev = resolve_device(device)
        return VllmEngine(_vllm_folder(source, weights=True), device=dev,
                          dtype=str(resolve_dtype(dtype, dev)).replace("torch.", ""))
    from flipcheck.evaluation.engines.transformers import TransformersEngine

    model = load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return TransformersEngine(model, dequantized_from=gguf)


def _vllm_folder(source, *, weights: bool):
    if getattr(source, "gguf", None):
        raise FlipcheckError(f"{source.spec}: the vllm engine runs model folders and hub models; score a GGUF "
                             "with --engine llama.cpp")
    return source.local_folder(weights=weights)
