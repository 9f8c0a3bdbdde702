"""Compression methods, one module each; importing this package registers them all."""

from flipcheck.compressors import bnb, layer_drop, noise, slicegpt  # noqa: F401
from flipcheck.compressors.registry import (
    CompressionReport,
    MethodConfig,
    get_method,
    make_config,
    methods,
    register,
)

__all__ = ["CompressionReport", "MethodConfig", "get_method", "make_config", "methods", "register"]
