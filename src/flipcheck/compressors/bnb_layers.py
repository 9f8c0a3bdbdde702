"""bitsandbytes' quantized Linear layers as flipcheck reads them: which modules they are, the weight
each effectively multiplies by, the bits it stores, and the exact canonical state of a 4-bit layer
that bitsandbytes' AVX512-BF16 CPU path repacked (:mod:`flipcheck.compressors.bnb` makes the layers;
:mod:`flipcheck.compressors.stats` measures them through this module)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from flipcheck.errors import FlipcheckError


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - a dependency of flipcheck
        raise FlipcheckError(
            f"method bnb needs the bitsandbytes package ({err}); install it with `pip install bitsandbytes`"
        ) from err
    return bnb


def is_bnb_linear(module: torch.nn.Module) -> bool:
    """True for bitsandbytes' quantized Linear layers (``Linear4bit``, ``Linear8bitLt``)."""
    bnb = _bnb()
    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def _int8_tensors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight C, float32 row scales SCB) of a Linear8bitLt, before or after its first forward."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    if scb is None or module.weight.dtype != torch.int8:
        raise FlipcheckError(f"Linear8bitLt with weight dtype {module.weight.dtype} is not quantized yet")
    return module.weight.data, scb


_CANONICAL = "_flipcheck_quant_state"  # a 4-bit layer's quantization state as quantized


def _is_repacked(module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def restore_canonical(module: torch.nn.Module, *_: Any) -> None:
    """Put a 4-bit layer that bitsandbytes' AVX512-BF16 path repacked back to the packed weight and
    quantization state it was quantized to, exactly (a no-op when it is not repacked).

    The nibble permutation is undone with bitsandbytes' inverse (exact); the state (float32 or
    double-quantized absmaxes) comes from the copy :func:`keep_canonical` took. The next forward
    repacks again. Also a ``state_dict`` pre-hook, so a save always writes the canonical tensors.
    """
    if not _is_repacked(module):
        return
    state = getattr(module, _CANONICAL, None)
    if state is None:
        raise FlipcheckError(
            "this 4-bit layer was repacked by bitsandbytes' AVX512-BF16 CPU kernel during a forward and its "
            "original state was not kept; its weights can no longer be read or saved exactly. Load bnb children "
            "with flipcheck.models.load_model, or call flipcheck.compressors.bnb.keep_canonical(model) before "
            "the first forward."
        )
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, _ = _convert_weight_packed_for_cpu_inverse(module.weight.data, copy.copy(module.weight.quant_state))
    fresh = copy.deepcopy(state)
    module.weight.data = data
    module.weight.quant_state = fresh
    module.quant_state = fresh


def keep_canonical(model: torch.nn.Module) -> int:
    """Keep a copy of the quantization state of every 4-bit layer that may be repacked on a forward
    (AVX512-BF16 CPUs), and restore it before every ``state_dict``. Returns the layers covered."""
    bnb = _bnb()
    n = 0
    for mod in model.modules():
        if not isinstance(mod, bnb.nn.Linear4bit) or not getattr(mod, "support_avx512bf16_for_cpu", False):
            continue
        if hasattr(mod, _CANONICAL):
            continue
        restore_canonical(mod)  # a layer that raises here was repacked before we saw it
        setattr(mod, _CANONICAL, copy.deepcopy(mod.weight.quant_state))
        mod.register_state_dict_pre_hook(restore_canonical)
        n += 1
    return n


def cpu_kernel(model: torch.nn.Module) -> str | None:
    """Which bitsandbytes path the model's CPU 4-bit layers take: "avx512_bf16 repack" (bfloat16
    absmaxes and matmul, weights repacked on the first forward) or "reference" (dequantize ->
    matmul in compute_dtype); None without 4-bit layers on the CPU (int8 and GPUs have one path)."""
    bnb = _bnb()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    if not layers:
        return None
    fast = any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    return "avx512_bf16 repack" if fast else "reference"


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes Linear effectively multiplies by, as a float tensor (out, in).

    4-bit: ``a_b * q[idx]`` (bitsandbytes.functional.dequantize_4bit); int8: ``C * s / 127``
    (bitsandbytes.functional.int8_vectorwise_dequant). A plain Linear returns its weight.
    """
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        restore_canonical(module)
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb, scb = _int8_tensors(module)
        return bnb.functional.int8_vectorwise_dequant(cb, scb)
    return module.weight.detach()


def storage_bits(module: torch.nn.Module) -> tuple[int, int]:
    """(bits stored for the weight, number of logical weights) of one Linear, read off its tensors.

    Counts the quantized weight and its per-block / per-row statistics (absmax, nested absmax, SCB);
    per-module constants (code tables, double-quant offset) are left out, see the module docstring.
    """
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        restore_canonical(module)
        qs = module.weight.quant_state
        data = module.weight.data
        bits = data.numel() * data.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
        if qs.nested:
            bits += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8
        return bits, int(torch.Size(qs.shape).numel())
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb, scb = _int8_tensors(module)
        return cb.numel() * cb.element_size() * 8 + scb.numel() * scb.element_size() * 8, cb.numel()
    w = module.weight
    return w.numel() * w.element_size() * 8, w.numel()
