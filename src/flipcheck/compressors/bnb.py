"""bitsandbytes quantization: LLM.int8() and 4-bit NF4 / FP4, applied in place to a loaded model.

Modes (bitsandbytes' own kernels; the checkpoint is what ``BitsAndBytesConfig`` loading writes):

- ``int8``: LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339). Each weight row is quantized by
  its absolute maximum, ``C_ij = round(127 * W_ij / s_i)`` with ``s_i = max_j |W_ij|`` (stored as
  ``SCB``, one float32 per output row). At run time each activation row is quantized the same way,
  ``Y = (C_X C_W^T) * s_X s_W^T / 127^2``, except the *outlier* input features: every column of X
  holding a value with ``|x| >= threshold`` (6.0 in the paper) is taken out and multiplied in 16/32
  bit. Departure from the paper: the weights are stored only in int8, so bitsandbytes multiplies the
  outlier columns by the *dequantized* weight columns ``C_W * s_W / 127``, not the original 16-bit
  ones; and activations are quantized through float16 whatever the model's dtype.
- ``nf4`` / ``fp4``: 4-bit blockwise quantization (Dettmers et al. 2023, QLoRA, arXiv 2305.14314).
  The flattened weight is cut into blocks of 64; each block stores ``a_b = max |W|`` over the block
  (float32) and every weight as the index of the nearest level of a 16-level code ``q``:
  ``W_hat = a_b * q[idx]``. NF4's levels are quantiles of N(0, 1) (information-theoretically right
  for normally distributed weights); FP4 is a 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
  ``double_quant`` quantizes the block absmaxes again: 8-bit blockwise (blocks of 256) after
  subtracting their mean.

Bits per stored weight, measured from the tensors the step produces (per-tensor lookup tables --
the 16-entry 4-bit code, the 256-entry code of double quant, its float32 offset -- are constants
per module and are left out):

- int8: ``8 + 32 / in_features`` (int8 weight + one float32 scale per row)
- nf4 / fp4: ``4 + 32 / 64`` = 4.5; with double quant ``4 + 8/64 + 32/(64*256)`` ~ 4.127

Only plain ``nn.Linear`` layers of the decoder are replaced (never the output head); the replaced
modules are ``bitsandbytes.nn.Linear8bitLt`` / ``Linear4bit`` built with the arguments transformers'
integration uses, and ``model.config.quantization_config`` is set to the matching
``BitsAndBytesConfig`` (its ``llm_int8_skip_modules`` lists every Linear left in full precision), so
``save_pretrained`` writes bitsandbytes' serialization and a plain
``AutoModelForCausalLM.from_pretrained(child)`` rebuilds the same modules.

CPU note (bitsandbytes 0.50.2): all three modes run on CPU. On CPUs with AVX512-BF16, bitsandbytes
4-bit layers repack their weights in place on the first forward, round the block absmaxes to
bfloat16 and compute in bfloat16 whatever ``compute_dtype`` says ("avx512_bf16 repack"); elsewhere
they compute ``dequantize -> matmul`` in ``compute_dtype`` ("reference"). A child flipcheck builds
or loads takes the path plain transformers takes on the same machine, so what flipcheck measures is
what a user of the saved child runs there; the report's ``extra["cpu_kernel"]`` (and flipcheck.json)
names the path. bitsandbytes' own undoing of the repacking is lossy (the bfloat16 absmaxes stay), so
flipcheck keeps each layer's quantization state as quantized and puts the layer back into it
exactly before any ``state_dict`` (save, fingerprint) or measurement (:func:`restore_canonical`):
a child can be saved, dequantized or measured before or after any forward.
:func:`pin_reference_kernels` switches the fast path off (the reference path on every CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from flipcheck.compressors.bnb_layers import (  # noqa: F401 - re-exported
    _bnb,
    cpu_kernel,
    dequantized_weight,
    is_bnb_linear,
    keep_canonical,
    restore_canonical,
    storage_bits,
)
from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.stats import step_report, targeted_linears
from flipcheck.errors import FlipcheckError
from flipcheck.loaders import register_loader
from flipcheck.models import DTYPES

log = logging.getLogger(__name__)

BLOCKSIZE_4BIT = 64  # bitsandbytes' default 4-bit block size (QLoRA)
NESTED_BLOCKSIZE = 256  # block size of double quantization of the absmaxes
MODES_4BIT = ("nf4", "fp4")
MODES = ("int8", *MODES_4BIT)
LOADER = "bnb"  # name of the flipcheck loader for bnb children (flipcheck.json "loader")


class BnbConfig(MethodConfig):
    """bitsandbytes LLM.int8() (outlier threshold) or 4-bit NF4/FP4 (block 64, optional double quant)."""

    mode: Literal["int8", "nf4", "fp4"] = Field(
        "int8",
        description="int8 = LLM.int8() with outlier decomposition; nf4 / fp4 = 4-bit blockwise (QLoRA)",
    )
    threshold: float = Field(
        6.0,
        ge=0.0,
        le=1e6,
        description="int8 only: input features with any |x| >= threshold go through a full-precision matmul; 0 = pure int8",
    )
    double_quant: bool = Field(
        False,
        description="nf4/fp4 only: quantize the block absmaxes again to 8 bit (QLoRA double quantization)",
    )
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="nf4/fp4 only: dtype of the dequantized matmul; auto = the model's weight dtype"
    )
    skip_modules: list[str] | None = Field(
        None,
        description="fnmatch globs of decoder Linear names to keep in full precision (e.g. '*down_proj')",
    )

    @model_validator(mode="after")
    def _settings_fit_mode(self) -> BnbConfig:
        if self.mode == "int8":
            if self.double_quant:
                raise ValueError(
                    "double_quant applies to the 4-bit modes (nf4, fp4) only, not to mode 'int8'"
                )
            if self.compute_dtype != "auto":
                raise ValueError(
                    "compute_dtype applies to the 4-bit modes (nf4, fp4) only; mode 'int8' computes in the "
                    "input's dtype (leave compute_dtype at 'auto')"
                )
        elif "threshold" in self.model_fields_set:
            raise ValueError(f"threshold applies to mode 'int8' only, not to mode {self.mode!r}")
        return self


# --------------------------------------------------------------------------------------------
# pure measurements on bitsandbytes modules


def pin_reference_kernels(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on the reference ``dequantize -> matmul(compute_dtype)`` path.

    Switches off the AVX512-BF16 CPU fast path (weights repacked on first forward, bf16 absmax, bf16
    matmul), so results do not depend on the CPU's instruction set; a layer already repacked is put
    back first. Plain transformers does not do this: a child evaluated pinned on an AVX512-BF16 CPU
    is not what its users run there. Returns the number of layers changed; a no-op on GPUs and CPUs
    without AVX512-BF16.
    """
    bnb = _bnb()
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and getattr(mod, "support_avx512bf16_for_cpu", False):
            restore_canonical(mod)
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# building the quantized modules


def _check_model(model: torch.nn.Module, config: BnbConfig) -> list[tuple[str, torch.nn.Linear]]:
    """Everything that can go wrong, checked before any module is replaced."""
    bnb = _bnb()
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None:
        method = (
            existing.get("quant_method")
            if isinstance(existing, dict)
            else getattr(existing, "quant_method", "?")
        )
        raise FlipcheckError(
            f"bnb: the model is already quantized ({getattr(method, 'value', method)}); bnb needs a full-precision "
            "model, so put it last in a recipe and after no other quantization step"
        )
    linears = targeted_linears(model, exclude=config.skip_modules)
    already = [n for n, m in linears if is_bnb_linear(m)]
    if already:
        raise FlipcheckError(
            f"bnb: {len(already)} Linear layers are already bitsandbytes layers (e.g. {already[0]})"
        )
    linears = [(n, m) for n, m in linears if type(m) is torch.nn.Linear]
    if not linears:
        raise FlipcheckError(
            f"bnb: no decoder nn.Linear layer left to quantize (skip_modules={config.skip_modules!r})"
        )
    supported = getattr(bnb, "supported_torch_devices", {"cpu", "cuda"})
    for name, mod in linears:
        dev = mod.weight.device.type
        if dev not in supported:
            raise FlipcheckError(
                f"bnb: layer {name} is on device {dev!r}; bitsandbytes {bnb.__version__} runs on: "
                f"{', '.join(sorted(supported))}"
            )
        if not mod.weight.dtype.is_floating_point:
            raise FlipcheckError(f"bnb: layer {name} has non-float weight dtype {mod.weight.dtype}")
    return linears


def resolve_compute_dtype(
    config: BnbConfig, linears: list[tuple[str, torch.nn.Linear]]
) -> torch.dtype | None:
    """The 4-bit matmul dtype: the setting, or (auto) the dtype of the weights being replaced."""
    if config.mode == "int8":
        return None
    if config.compute_dtype != "auto":
        return DTYPES[config.compute_dtype]
    dtypes = {m.weight.dtype for _, m in linears}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def bnb_quantization_config(config: BnbConfig, compute_dtype: torch.dtype | None, skip: list[str]):
    """The ``BitsAndBytesConfig`` that describes (and reloads) the child."""
    from transformers import BitsAndBytesConfig

    if config.mode == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(config.threshold), llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.mode,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


@torch.no_grad()
def quantize_linear(linear: torch.nn.Linear, qconfig) -> torch.nn.Module:
    """A bitsandbytes Linear holding `linear`'s weight quantized on `linear`'s device.

    Built with the constructor arguments transformers' ``replace_with_bnb_linear`` uses, then the
    weight is quantized by bitsandbytes itself (``Params4bit`` / ``Int8Params`` moved to the device).
    """
    bnb = _bnb()
    device = linear.weight.device
    has_bias = linear.bias is not None
    with torch.device("meta"):
        if qconfig.load_in_8bit:
            new = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                has_bias,
                has_fp16_weights=qconfig.llm_int8_has_fp16_weight,
                threshold=qconfig.llm_int8_threshold,
            )
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                has_bias,
                qconfig.bnb_4bit_compute_dtype,
                compress_statistics=qconfig.bnb_4bit_use_double_quant,
                quant_type=qconfig.bnb_4bit_quant_type,
                quant_storage=qconfig.bnb_4bit_quant_storage,
            )
    w = linear.weight.detach()
    if qconfig.load_in_8bit:
        # Int8Params quantizes when it leaves the CPU for a real device (CPU -> CPU included)
        new.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        new.weight = bnb.nn.Params4bit(
            w,
            requires_grad=False,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=qconfig.bnb_4bit_use_double_quant,
            quant_type=qconfig.bnb_4bit_quant_type,
            quant_storage=qconfig.bnb_4bit_quant_storage,
            module=new,
        ).to(device)
    if has_bias:
        new.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    new.source_cls = torch.nn.Linear  # what transformers' loader records on the modules it builds
    new.requires_grad_(False)
    new.train(linear.training)
    return new


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _mark_quantized(model: torch.nn.Module, qconfig) -> None:
    """Attach the quantizer the way ``from_pretrained(quantization_config=...)`` leaves a model:
    ``config.quantization_config`` (what ``save_pretrained`` writes), ``hf_quantizer`` and the
    ``is_loaded_in_{4,8}bit`` flags."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def _full_precision_linears(model: torch.nn.Module) -> list[str]:
    """Names of the Linear (and Conv1D) layers left unquantized, for ``llm_int8_skip_modules``."""
    out = []
    for name, mod in model.named_modules():
        if is_bnb_linear(mod):
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            out.append(name)
    return out


_FP16_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes warns at every int8 matmul that activations are quantized through float16; that
    is LLM.int8()'s documented behaviour (see the module docstring), logged once by flipcheck."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_FP16_CAST_MESSAGE)


def _quiet_int8_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in logger.filters):
        logger.addFilter(_DropInt8CastWarning())


def apply_bnb(model: torch.nn.Module, config: BnbConfig, calibration: Any = None) -> CompressionReport:
    """Replace the decoder's Linear layers by bitsandbytes layers, in place (see module docstring)."""
    linears = _check_model(model, config)
    compute_dtype = resolve_compute_dtype(config, linears)
    targeted_names = {n for n, _ in linears}
    skip = [n for n in _full_precision_linears(model) if n not in targeted_names]
    qconfig = bnb_quantization_config(config, compute_dtype, skip)
    if config.mode == "int8":
        _quiet_int8_cast_warning()
        log.info(
            "bnb int8: activations are quantized through float16 (LLM.int8()), outliers |x| >= %s",
            config.threshold,
        )

    bits = 0
    for name, linear in linears:
        new = quantize_linear(linear, qconfig)
        _set_submodule(model, name, new)
        bits += storage_bits(new)[0]
    _mark_quantized(model, qconfig)
    # an earlier llm-compressor step (wanda, sparsegpt) wrapped save_pretrained to write its own
    # compressed format, which cannot hold bitsandbytes layers: transformers' own save writes them
    model.__dict__.pop("save_pretrained", None)
    keep_canonical(model)
    kernel = cpu_kernel(model)
    log.info(
        "bnb %s: quantized %d Linear layers, kept %d in full precision; CPU kernel: %s",
        config.mode, len(linears), len(skip), kernel or "n/a",
    )

    return step_report(
        "bnb",
        config,
        model,
        targeted=len(linears),
        extra={
            "cpu_kernel": kernel,
            "mode": config.mode,
            "threshold": config.threshold if config.mode == "int8" else None,
            "double_quant": config.double_quant,
            "blocksize": BLOCKSIZE_4BIT if config.mode in MODES_4BIT else None,
            "compute_dtype": str(compute_dtype).removeprefix("torch.") if compute_dtype else None,
            "quantized_weight_bytes": bits // 8,
            "full_precision_linears": skip,
            "bitsandbytes_version": _bnb().__version__,
            "provenance": {"quantized_on_load": True, "loader": LOADER},
        },
    )


# --------------------------------------------------------------------------------------------
# loading a saved child


def load_bnb_child(path: Path, provenance: dict, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Load a bnb child folder with transformers (which rebuilds the bitsandbytes layers from
    ``quantization_config``), keeping the kernels plain transformers picks on this machine and the
    state to save or measure the layers exactly (:func:`keep_canonical`). `dtype` applies to the
    layers that are not quantized (embeddings, norms, output head)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map="auto" if device == "auto" else {"": str(device)}, use_safetensors=True,
        trust_remote_code=False,
    )
    keep_canonical(model)
    return model.eval()


register_loader(LOADER, load_bnb_child)
register("bnb", BnbConfig, apply_bnb, needs_calibration=False, produces="bnb")
