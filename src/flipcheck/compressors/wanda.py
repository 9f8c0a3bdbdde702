"""Wanda pruning (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024, arXiv 2306.11695), run by llm-compressor's ``WandaPruningModifier``.

Each weight is scored by its magnitude times the norm of the input feature it multiplies, over
the calibration tokens:

    S_ij = |W_ij| · ||X_j||_2

and, within each output row, the lowest-scoring `sparsity` fraction is set to zero (so every row
loses floor(sparsity · in_features) weights). With an N:M mask, the M-N lowest scores of every M
consecutive input weights of a row are zeroed instead. No weight is updated; unlike magnitude
pruning, weights that meet large activations survive.
"""

from __future__ import annotations

from flipcheck.compressors.llmc import prune_ignore
from flipcheck.compressors.pruning import PruningConfig, pruning_needs_data
from flipcheck.compressors.registry import register


class WandaConfig(PruningConfig):
    """Wanda: zero the weights with the smallest |W|·||X|| in each row, unstructured or N:M."""


def wanda_modifiers(config: WandaConfig, head: str, model=None) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    if config.is_identity():
        return []
    return [WandaPruningModifier(**config.pruning_args(model, prune_ignore(head)))]


register("wanda", WandaConfig, modifiers=wanda_modifiers, needs_calibration=pruning_needs_data, produces="sparse")
