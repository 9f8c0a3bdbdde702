"""SparseGPT pruning (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023, arXiv 2301.00774), run by llm-compressor's ``SparseGPTModifier``.

Pruning as a layer-wise reconstruction problem, argmin ||W X - Ŵ X||² over Ŵ with the mask's zeros,
solved column by column with the inverse Hessian H^-1 of H = X X^T + λ·mean(diag(H))·I: in each
block of `block_size` columns the weights with the smallest

    w_ij² / [H^-1]_jj²

are zeroed (the `sparsity` fraction of the block, or M-N of every M with an N:M mask) and the
error each zero introduces is compensated by updating the columns not yet processed,
δ = -(w_ij / [H^-1]_jj) · [H^-1]_{j,:}. Unlike Wanda, the surviving weights change.

llm-compressor selects with ``<=`` a threshold, so an unstructured block loses
floor(sparsity · size) + 1 weights (ties aside): measured sparsity can exceed the request by one
weight per block. Sparsity 0 runs nothing (the engine would still zero one weight per block).
"""

from __future__ import annotations

from pydantic import Field

from flipcheck.compressors.llmc import prune_ignore
from flipcheck.compressors.pruning import PruningConfig, pruning_needs_data
from flipcheck.compressors.registry import register


class SparseGPTConfig(PruningConfig):
    """SparseGPT: prune with second-order error compensation of the remaining weights (llm-compressor)."""

    block_size: int = Field(128, ge=1, le=8192, description="columns pruned per block before the lazy update")
    dampening_frac: float = Field(0.01, ge=0.0, le=1.0, description="λ added to diag(H) as a fraction of its mean")


def sparsegpt_modifiers(config: SparseGPTConfig, head: str, model=None) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    if config.is_identity():
        return []
    return [
        SparseGPTModifier(
            block_size=config.block_size,
            dampening_frac=config.dampening_frac,
            **config.pruning_args(model, prune_ignore(head)),
        )
    ]


register("sparsegpt", SparseGPTConfig, modifiers=sparsegpt_modifiers, needs_calibration=pruning_needs_data, produces="sparse")
