"""Measurements every method's report reads off the model it leaves: one function, :func:`measure`.

What is counted, whatever steps came before (wanda then bnb, gptq then layer_drop, ...):

- **parameters**: logical weights of the whole model. A packed 4-bit weight counts its
  ``out * in`` entries (bitsandbytes stores two per byte); quantization scales, zero points and
  group indices are storage, not parameters; tied weights count once.
- **bits per weight**: over the decoder Linears (every ``nn.Linear`` but the output head), the bits
  their weights actually take in storage, scales and zero points included, divided by the number
  of logical weights. A float32 layer is 32; int4 with group 128 and fp16 scales 4.125; bnb nf4 4.5.
- **sparsity**: fraction of exact zeros among those logical weights (quantized layers are
  dequantized first, so zeros a pruning step left behind are counted after quantization too).

Bytes on disk are measured on the saved folder (``flipcheck.models.folder_weight_bytes``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch

# Tensors a quantized (compressed-tensors) Linear carries besides its weight: bits, not parameters.
_QPARAM_SUFFIXES = ("_scale", "_zero_point", "_global_scale", "_g_idx", "_shape")


@dataclass(frozen=True)
class WeightStats:
    """What :func:`measure` reads off a model (see the module docstring for the definitions)."""

    parameters: int  # logical parameters of the whole model
    bits_per_weight: float  # storage bits / logical weights over the decoder Linears
    sparsity: float  # fraction of zeros among the decoder Linears' logical weights
    linears: int  # decoder Linears measured
    quantized: int  # of which quantized (compressed-tensors or bitsandbytes)
    storage_bits: float = 0.0  # bits the decoder Linears' weights take in storage (bits_per_weight x their weights)
    weights: int = 0  # logical weights of the decoder Linears


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
    """Distinct parameter tensors' elements as stored (tied weights counted once); see
    :func:`logical_parameters` for the count a report gives."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def _is_bnb(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def _is_quantization_parameter(module: torch.nn.Module, name: str) -> bool:
    return (
        getattr(module, "quantization_scheme", None) is not None
        and name != "weight"
        and name.startswith(("weight", "input", "output"))
        and name.endswith(_QPARAM_SUFFIXES)
    )


def logical_parameters(model: torch.nn.Module) -> int:
    """Logical parameters: packed 4-bit weights count their unpacked entries; scales, zero points
    and group indices of quantized layers are not counted; tied weights count once."""
    seen, total = set(), 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.data_ptr() in seen or _is_quantization_parameter(mod, name):
                continue
            seen.add(p.data_ptr())
            shape = getattr(getattr(p, "quant_state", None), "shape", None)
            total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total


def compressed_tensors_bits(module: torch.nn.Module) -> float | None:
    """Bits one compressed-tensors quantized Linear's weight takes in the checkpoint, or None.

        bits = numel(W)·b + numel(scale)·bits(scale dtype) + [asymmetric] numel(zero point)·b
               + numel(global scale)·bits(its dtype) + numel(g_idx)·32

    b is the weight's num_bits; zero points are packed at b bits (compressed-tensors'
    pack-quantized format) and are not stored for symmetric schemes. For W4A16 with group 128 and
    fp16 scales that is 4 + 16/128 = 4.125 bits per weight; with fp32 scales 4.25.
    """
    args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if args is None or not hasattr(module, "weight_scale"):
        return None
    bits = module.weight.numel() * args.num_bits
    scale = module.weight_scale
    bits += scale.numel() * dtype_bits(scale.dtype)
    zp = getattr(module, "weight_zero_point", None)
    if zp is not None and not args.symmetric:
        bits += zp.numel() * args.num_bits
    gs = getattr(module, "weight_global_scale", None)
    if gs is not None:
        bits += gs.numel() * dtype_bits(gs.dtype)
    g_idx = getattr(module, "weight_g_idx", None)
    if g_idx is not None:
        bits += g_idx.numel() * 32
    return float(bits)


@torch.no_grad()
def linear_storage(module: torch.nn.Module) -> tuple[float, int, int, bool]:
    """(storage bits, logical weights, zeros among them, quantized?) of one Linear's weight."""
    if _is_bnb(module):
        from flipcheck.compressors.bnb_layers import dequantized_weight, storage_bits

        bits, n = storage_bits(module)
        return float(bits), n, int((dequantized_weight(module) == 0).sum()), True
    w = module.weight
    zeros = int((w == 0).sum())
    ct_bits = compressed_tensors_bits(module)
    if ct_bits is not None:
        return ct_bits, w.numel(), zeros, True
    return float(w.numel() * dtype_bits(w.dtype)), w.numel(), zeros, False


def measure(model: torch.nn.Module) -> WeightStats:
    """Parameters, bits per weight and sparsity of `model` as it stands (module docstring)."""
    bits, n, zeros, quantized = 0.0, 0, 0, 0
    linears = targeted_linears(model)
    for _, mod in linears:
        b, k, z, q = linear_storage(mod)
        bits, n, zeros, quantized = bits + b, n + k, zeros + z, quantized + q
    return WeightStats(
        parameters=logical_parameters(model),
        bits_per_weight=bits / n if n else 0.0,
        sparsity=zeros / n if n else 0.0,
        linears=len(linears),
        quantized=quantized,
        storage_bits=bits,
        weights=n,
    )


def step_report(
    method: str,
    config: Any,
    model: torch.nn.Module,
    *,
    targeted: int,
    calibration: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
):
    """The CompressionReport of one step, its figures measured on the model the step leaves.

    `config` is the step's MethodConfig; `targeted` the number of Linear weights it changed;
    `calibration` the calibration it used (``Calibration.describe()``) or None.
    """
    from flipcheck.compressors.registry import CompressionReport

    stats = measure(model)
    return CompressionReport(
        method=method,
        config=config.model_dump(),
        parameters=stats.parameters,
        bits_per_weight=stats.bits_per_weight,
        sparsity=stats.sparsity,
        calibration=calibration,
        targeted=targeted,
        extra={"quantized_linears": stats.quantized, "storage_bits": stats.storage_bits, "linear_weights": stats.weights,
               **(extra or {})},
    )
