"""Optional dependencies (pyproject's extras) that more than one layer needs: whether one is
installed, and the one-line error that names the command installing it."""

from __future__ import annotations

from flipcheck.errors import FlipcheckError

LLAMACPP_HINT = 'pip install "flipcheck[llamacpp]"  (builds llama-cpp-python from source: needs a C++ compiler and cmake)'


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_llamacpp(what: str = "the llama.cpp engine") -> None:
    if not llamacpp_available():
        raise FlipcheckError(f"{what} needs llama-cpp-python, which is not installed: {LLAMACPP_HINT}")
