"""Third-party output of a command, away from the terminal: into ``run.log`` in the run folder.

transformers, datasets, huggingface_hub, lm-eval, accelerate and llm-compressor / compressed-tensors
write warnings, log lines and tqdm bars to stderr ("Applying quantization config", "Dispatching
model", "Tokenizing inputs", the clean_up_tokenization_spaces warning, ...), several with
``disable=False`` passed explicitly, so ``TQDM_DISABLE`` does not reach them. Inside
:func:`third_party_output`:

- the loggers of those libraries (and Python's ``warnings``, through ``py.warnings``) have one
  handler, the log file, and do not propagate (warnings and above; lm-eval's notes too); each library's own logging set-up runs first, so
  a library configuring itself on import cannot add its stderr handler back;
- llm-compressor's loguru logger writes to the log file only;
- every tqdm bar created without an explicit ``file`` writes to the log file: lm-eval's, the
  libraries', and the per-request bars of flipcheck's own lm-eval model (FlipLM), which look like
  lm-eval's; the command's one progress view is the rich bar the CLI draws
  (:mod:`flipcheck.progress`).

The log file is ``run.log`` when the command has a run folder, else nothing is kept. flipcheck's
own log lines (the ``flipcheck`` logger) are untouched: every warning it emits reaches the
terminal. With ``-v`` nothing is redirected.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

RUN_LOG = "run.log"

# stdlib loggers of the libraries a command runs (their children inherit the handler)
THIRD_PARTY = ("transformers", "datasets", "huggingface_hub", "lm_eval", "lm-eval", "accelerate", "llmcompressor",
               "compressed_tensors", "urllib3", "filelock", "fsspec", "matplotlib", "PIL", "bitsandbytes", "vllm", "openai", "httpx", "py.warnings")
LEVELS = {"lm_eval": logging.INFO}  # what reaches the log: lm-eval's progress notes; warnings of the others


def _configure_libraries() -> None:
    """Run each installed library's own logging set-up now, so that it cannot run later and add a
    stderr handler of its own on top of ours."""
    for module, call in (("transformers.utils.logging", "get_logger"), ("datasets.utils.logging", "get_logger"),
                         ("huggingface_hub.utils.logging", "get_logger")):
        with contextlib.suppress(Exception):
            getattr(importlib.import_module(module), call)()
    with contextlib.suppress(Exception):
        importlib.import_module("lm_eval.utils").setup_logging(logging.WARNING)


@contextlib.contextmanager
def _tqdm_to(stream: TextIO) -> Iterator[None]:
    try:
        from tqdm import std
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        yield
        return
    saved = std.tqdm.__dict__["__init__"]  # put back as it was (tqdm wraps it to read TQDM_* variables)
    original = std.tqdm.__init__

    def init(self, *args, **kwargs):
        if len(args) < 5 and kwargs.get("file") is None:
            kwargs["file"] = stream
        original(self, *args, **kwargs)

    std.tqdm.__init__ = init
    try:
        yield
    finally:
        std.tqdm.__init__ = saved


@contextlib.contextmanager
def _loguru_to(stream: TextIO) -> Iterator[None]:
    try:
        from loguru import logger
    except ImportError:
        yield
        return
    logger.remove()
    logger.add(stream, level="INFO")
    try:
        yield
    finally:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")  # what the CLI's logging set-up leaves


class _LazyLog:
    """An append-only text file opened on the first write: a command that fails before any library
    speaks leaves no run folder behind."""

    encoding = "utf-8"

    def __init__(self, path: Path):
        self.path = path
        self._file: TextIO | None = None

    def write(self, text: str) -> int:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def third_party_output(run_folder: str | os.PathLike | None, *, verbose: bool = False) -> Iterator[Path | None]:
    """Route third-party output to ``RUN_FOLDER/run.log`` (appended, created on the first line;
    discarded without a folder) while the block runs; yields the log's path (None when nothing is
    kept). ``verbose``: leave everything where it is."""
    if verbose:
        yield None
        return
    path = Path(run_folder) / RUN_LOG if run_folder is not None else None
    stream: Any = _LazyLog(path) if path is not None else open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    _configure_libraries()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    saved = []
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, lg.propagate, list(lg.handlers)))
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(LEVELS.get(name, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn(...) -> the py.warnings logger, set above
    try:
        with _tqdm_to(stream), _loguru_to(stream):
            yield path
    finally:
        logging.captureWarnings(False)
        for lg, level, propagate, handlers in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        stream.close()
