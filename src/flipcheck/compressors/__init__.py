"""Compression methods, one module each; importing this package registers them all."""

from flipcheck.compressors import (  # noqa: F401  (each module registers its method)
    awq,
    bnb,
    gguf,
    gptq,
    layer_drop,
    noise,
    rtn,
    slicegpt,
    smoothquant,
    sparsegpt,
    wanda,
)
from flipcheck.compressors.registry import (
    CompressionReport,
    MethodConfig,
    get_method,
    make_config,
    methods,
    register,
)

__all__ = ["CompressionReport", "MethodConfig", "get_method", "make_config", "methods", "register"]
