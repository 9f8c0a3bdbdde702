"""flipcheck: compress a language model and measure how far it drifts from its parent.

The Python API equals the CLI:

    import flipcheck
    child = flipcheck.compress("demo-parent/", [("wanda", {"sparsity": 0.5})], out="runs/wanda50")
    report = flipcheck.evaluate("demo-parent/", "runs/wanda50", tasks="flipcheck_demo", out="runs/eval")
    report = flipcheck.sweep("demo", "noise", {"sigma": [0.02, 0.05]}, out="runs/noise")
    report = flipcheck.run_recipe(flipcheck.load_recipe("paper-quant"), "runs/paper-quant")
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "compress": ("flipcheck.compressors.pipeline", "compress"),
    "evaluate": ("flipcheck.orchestrate.evaluate", "evaluate"),
    "compare": ("flipcheck.evaluation.compare", "compare"),
    "sweep": ("flipcheck.orchestrate.recipe", "sweep"),
    "run_recipe": ("flipcheck.orchestrate.recipe", "run_recipe"),
    "load_recipe": ("flipcheck.recipes.schema", "load_recipe"),
    "FlipcheckError": ("flipcheck.errors", "FlipcheckError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import the API lazily: `import flipcheck` stays cheap (no torch until it is needed)."""
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'flipcheck' has no attribute {name!r}")
