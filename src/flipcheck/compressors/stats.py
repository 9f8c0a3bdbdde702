"""Measurements shared by the methods' reports: what is targeted, parameters, sparsity."""

from __future__ import annotations

import fnmatch

import torch


def targeted_linears(
    model: torch.nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers of the decoder (every nn.Linear but the output head), filtered by name globs.

    `include`/`exclude` are fnmatch patterns on the module's qualified name (e.g. ``*mlp*``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is head:
            continue
        if include and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        out.append((name, mod))
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def weight_sparsity(weights: list[torch.Tensor]) -> float:
    """Fraction of exact zeros over all the given tensors."""
    n = sum(w.numel() for w in weights)
    if n == 0:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / n


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits
