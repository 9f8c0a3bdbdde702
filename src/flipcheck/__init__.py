"""flipcheck: compress a language model and measure how far it drifts from its parent."""

__version__ = "0.1.0"
