"""The shared runner for the methods whose engine is llm-compressor's ``oneshot``.

gptq, awq, smoothquant, rtn, wanda and sparsegpt each describe their work as a list of
llm-compressor modifiers (:func:`modifiers_for`); :func:`run_oneshot` runs any such list on a
model in place, so a recipe's consecutive llm-compressor steps (e.g. wanda 2:4 then gptq W4A16)
can be merged into one calibration run.

What ``run_oneshot`` takes care of, so that callers need not:

- **a config folder**: ``oneshot`` reads ``config._name_or_path/config.json``. Models built in
  memory have no folder, and a model changed by an earlier step (layers dropped, slicing) no
  longer matches its source folder. The current config is written to a temporary folder and
  ``_name_or_path`` points there for the call (and for every later ``save_pretrained``, which
  re-reads that path), then is restored.
- **checks before any work**: group quantization needs every targeted Linear's in_features to be
  a multiple of the group size, N:M masks need it to be a multiple of M; a violation is a
  :class:`~flipcheck.errors.FlipcheckError` naming the layer, its width and the sizes that work.
- **AWQ on CPU**: AWQ pins its cached activations (``IntermediatesCache.pin_memory``) to speed up
  host-to-device copies, which fails when there is no accelerator. Without one, pinning is
  switched off for the duration of the call (it only exists to overlap copies with compute).
- **quiet logs**: llm-compressor and compressed-tensors log through loguru to stdout; their
  records are muted during the call unless this module's logger is at DEBUG.
- **no stray files**: ``output_dir=None`` and no log dir, so nothing is written to the working
  directory.
- **materialized weights**: after calibration, schemes whose weights llm-compressor would only
  quantize on the fly in ``forward`` (RTN, AWQ) get their fake-quantized values written into
  ``weight``, as GPTQ already does. The forward is unchanged (quantizing a value on the grid
  returns it), and the weights in memory are the ones the child holds.

Saving: after ``oneshot`` the model's ``save_pretrained`` writes compressed-tensors' compressed
format (``pack-quantized`` int4, ``int-quantized`` int8, ``float-quantized`` fp8);
``AutoModelForCausalLM.from_pretrained`` reloads it with compressed-tensors and runs it with
identical logits. The ``recipe.yaml`` it writes holds the last oneshot's modifiers only.

Chains (:func:`apply_chain`): llm-compressor 0.14's GPTQ does not keep an existing sparsity mask,
so wanda 2:4 followed by gptq ends with fewer zeros and broken 2:4 groups (the reports show the
sparsity actually left); RTN keeps zeros at zero.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from flipcheck.compressors.calibration import Calibration
from flipcheck.compressors.registry import CompressionReport, MethodConfig
from flipcheck.compressors.stats import count_parameters, dtype_bits, targeted_linears, weight_sparsity
from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)

# Which module builds each method's modifiers. Imported lazily: the method modules import this one.
_BUILDERS: dict[str, tuple[str, str]] = {
    "gptq": ("flipcheck.compressors.gptq", "gptq_modifiers"),
    "awq": ("flipcheck.compressors.awq", "awq_modifiers"),
    "smoothquant": ("flipcheck.compressors.smoothquant", "smoothquant_modifiers"),
    "rtn": ("flipcheck.compressors.rtn", "rtn_modifiers"),
    "wanda": ("flipcheck.compressors.wanda", "wanda_modifiers"),
    "sparsegpt": ("flipcheck.compressors.sparsegpt", "sparsegpt_modifiers"),
}
LLMC_METHODS = tuple(_BUILDERS)

# Calibration batch size: samples all share one length, so batching changes no statistic (up to
# float rounding); on CPU a batch of 16 runs GPTQ ~4x and AWQ ~8x faster than the default of 1.
DEFAULT_BATCH_SIZE = 16
# Group sizes suggested when a requested one does not divide a layer's width.
_GROUP_CANDIDATES = (32, 64, 128, 256, 512, 1024)
# Tensors a quantized Linear carries besides its weight; they are bits, not parameters.
_QPARAM_SUFFIXES = ("_scale", "_zero_point", "_global_scale", "_g_idx", "_shape")


# --------------------------------------------------------------------------- modifiers


def head_name(model: torch.nn.Module) -> str:
    """Qualified name of the output head (never compressed); 'lm_head' when it cannot be found."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        for name, mod in model.named_modules():
            if mod is head:
                return name
    return "lm_head"


def prune_ignore(head: str) -> list[str]:
    """Ignore pattern for the head in pruning modifiers, which name a Linear target with a
    trailing dot (``lm_head.``); quantization modifiers take the plain name."""
    return [f"re:{re.escape(head)}\\.?$"]


def modifiers_for(name: str, config: MethodConfig, model: torch.nn.Module | None = None) -> list[Any]:
    """The llm-compressor modifiers that carry out method `name` with `config`.

    `model` only names the output head to leave alone (default ``lm_head``). Every Linear but the
    head is targeted. The list can be concatenated with other methods' lists and run in one
    :func:`run_oneshot`.
    """
    if name not in _BUILDERS:
        raise FlipcheckError(f"{name!r} is not an llm-compressor method; allowed: {', '.join(LLMC_METHODS)}")
    module_name, fn_name = _BUILDERS[name]
    build = getattr(importlib.import_module(module_name), fn_name)
    with _quiet_engine():  # building modifiers already logs (device probes)
        return build(config, head_name(model) if model is not None else "lm_head")


def quant_scheme(preset: str, group_size: int | str | None = "preset", *, targets: list[str] | None = None):
    """A compressed-tensors QuantizationScheme from a preset name, optionally regrouped.

    `group_size`: "preset" keeps the preset's weight layout; an int makes the weights group-wise
    with that group size; None (or "channel") makes them per output channel.
    """
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, targets or ["Linear"])
    if group_size == "preset":
        return scheme
    args = scheme.weights.model_dump()
    args.pop("zp_dtype", None)  # re-derived from the new layout
    if group_size is None or group_size == "channel":
        args.update(strategy="channel", group_size=None)
    else:
        args.update(strategy="group", group_size=int(group_size))
    return scheme.model_copy(update={"weights": QuantizationArgs(**args)})


# --------------------------------------------------------------------------- pruning settings

_MASK = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def none_from_text(value: Any) -> Any:
    """'None'/'null'/'' (as typed on a command line or in YAML) -> None; anything else unchanged."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    return value


def parse_mask(mask: str) -> tuple[int, int]:
    """'N:M' -> (N, M): at most N non-zeros in every M consecutive input weights (the N:M
    convention of NVIDIA's sparse tensor cores and the Wanda/SparseGPT papers; 2:4 = 50 %)."""
    match = _MASK.match(str(mask))
    if not match:
        raise ValueError(f"mask must look like 'N:M' (e.g. '2:4', '4:8'), got {mask!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not (1 <= n < m <= 256):
        raise ValueError(f"mask {mask!r}: need 1 <= N < M <= 256 (N weights kept of every M), e.g. '2:4', '4:8'")
    return n, m


class PruningConfig(MethodConfig):
    """Settings shared by the pruning methods: how many weights to zero, and in what pattern."""

    sparsity: float = Field(
        0.5, ge=0.0, lt=1.0, description="fraction of each targeted weight zeroed (0 = identity); implied by mask when set"
    )
    mask: str | None = Field(
        None, description="'N:M' semi-structured mask: keep N of every M consecutive input weights ('2:4', '4:8'); None = unstructured"
    )

    @field_validator("mask", mode="before")
    @classmethod
    def _check_mask(cls, v):
        v = none_from_text(v)
        if v is None:
            return v
        n, m = parse_mask(v)
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _mask_vs_sparsity(self):
        if self.mask is not None and "sparsity" in self.model_fields_set:
            n, m = parse_mask(self.mask)
            if abs(self.sparsity - (m - n) / m) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity} conflicts with mask={self.mask!r}, which zeroes {(m - n) / m:g} "
                    "of the weights; set only one of them"
                )
        return self

    def engine_args(self) -> dict[str, Any]:
        """llm-compressor's spelling: ``mask_structure='Z:M'`` with Z = weights *zeroed* per M."""
        if self.mask is None:
            return {"sparsity": self.sparsity, "mask_structure": "0:0"}
        n, m = parse_mask(self.mask)
        return {"sparsity": (m - n) / m, "mask_structure": f"{m - n}:{m}"}

    def is_identity(self) -> bool:
        return self.mask is None and self.sparsity == 0.0


def pruning_needs_data(config: PruningConfig) -> bool:
    """Pruning scores need activations, except at sparsity 0 where nothing runs."""
    return not config.is_identity()


# --------------------------------------------------------------------------- checks


def _strategy(args) -> str:
    s = getattr(args, "strategy", None)
    return getattr(s, "value", s) or ""


def _divisor_hint(widths: list[int], candidates=_GROUP_CANDIDATES) -> list[int]:
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    return [c for c in candidates if g and g % c == 0]


def check_group_sizes(layers: list[tuple[str, int]], group_size: int, setting: str = "group_size") -> None:
    """Every (name, in_features) must be a multiple of `group_size`; else a FlipcheckError.

    Group-wise quantization stores one scale per `group_size` consecutive input weights; the
    kernels that run the checkpoint (vLLM's, compressed-tensors') need whole groups.
    """
    bad = [(n, w) for n, w in layers if w % group_size]
    if not bad:
        return
    name, width = bad[0]
    works = _divisor_hint([w for _, w in layers])
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    hint = f"a group size that divides every targeted layer ({', '.join(map(str, works))}), or " if works else ""
    raise FlipcheckError(
        f"{setting}={group_size}: layer {name} has in_features={width}, which is not a multiple of "
        f"{group_size}{more}. Use {hint}group_size=None for per-channel quantization."
    )


def check_mask(layers: list[tuple[str, int]], m: int, mask: str) -> None:
    """N:M masks act on groups of M consecutive input weights: in_features must be a multiple of M."""
    bad = [(n, w) for n, w in layers if w % m]
    if bad:
        name, width = bad[0]
        raise FlipcheckError(
            f"mask={mask!r}: layer {name} has in_features={width}, not a multiple of M={m}; "
            f"use an M that divides {width} or unstructured sparsity (mask=None)"
        )


def _grouped_layers(model: torch.nn.Module, modifier) -> dict[int, list[tuple[str, int]]]:
    """{group size: [(layer, in_features)]} for the group-wise schemes of a quantization modifier."""
    from compressed_tensors.utils import match_named_modules

    out: dict[int, list[tuple[str, int]]] = {}
    config = modifier.resolved_config
    for scheme in config.config_groups.values():
        w = scheme.weights
        if w is None or _strategy(w) not in ("group", "tensor_group") or not w.group_size:
            continue
        for name, mod in match_named_modules(model, scheme.targets, config.ignore):
            if isinstance(mod, torch.nn.Linear):
                out.setdefault(int(w.group_size), []).append((name, mod.in_features))
    return out


def validate_modifiers(model: torch.nn.Module, modifiers: list[Any]) -> None:
    """Shape checks that llm-compressor would only fail on mid-run (or not at all)."""
    from llmcompressor.modifiers.quantization.quantization import QuantizationMixin

    linears = [(n, m.in_features) for n, m in targeted_linears(model)]
    for mod in modifiers:
        if isinstance(mod, QuantizationMixin):
            for size, layers in _grouped_layers(model, mod).items():
                check_group_sizes(layers, size)
        n_m = getattr(mod, "mask_structure", None)
        if n_m and n_m != "0:0":
            n, m = (int(x) for x in n_m.split(":"))
            check_mask(linears, m, f"{m - n}:{m}")


def needs_data(modifiers: list[Any]) -> bool:
    return any(getattr(m, "requires_calibration_data", False) for m in modifiers)


# --------------------------------------------------------------------------- the runner


def _write_config(model: torch.nn.Module, folder: str) -> None:
    model.config.to_json_file(os.path.join(folder, "config.json"))


@contextlib.contextmanager
def config_folder(model: torch.nn.Module) -> Iterator[str]:
    """Point ``model.config._name_or_path`` at a temporary folder holding the current config."""
    old = model.config._name_or_path
    with tempfile.TemporaryDirectory(prefix="flipcheck-config-") as tmp:
        _write_config(model, tmp)
        model.config._name_or_path = tmp
        try:
            yield tmp
        finally:
            model.config._name_or_path = old


_LOG_DISABLE_ENV = {"llmcompressor": "LLM_COMPRESSOR_LOG_DISABLED", "compressed_tensors": "COMPRESSED_TENSORS_LOG_DISABLED"}


@contextlib.contextmanager
def _quiet_engine() -> Iterator[None]:
    """Mute llm-compressor's and compressed-tensors' loguru records unless we log at DEBUG.

    Also makes sure loguru knows llm-compressor's METRIC level: it is only created when its logging
    is enabled at import, and GPTQ fails without it. (The one warning llm-compressor logs while it
    is first imported, "No accelerator available", cannot be muted from here.)
    """
    import llmcompressor  # noqa: F401  (its import re-enables its logs: import first, then mute)
    from loguru import logger as loguru_logger

    try:
        loguru_logger.level("METRIC")
    except ValueError:
        loguru_logger.level("METRIC", no=38)
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    for name in _LOG_DISABLE_ENV:
        loguru_logger.disable(name)
    try:
        yield
    finally:
        for name, env in _LOG_DISABLE_ENV.items():
            if os.environ.get(env, "").lower() not in ("true", "1", "yes"):
                loguru_logger.enable(name)


@contextlib.contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """AWQ pins its activation cache for faster host-to-device copies; without an accelerator
    ``Tensor.pin_memory`` raises, and there is nothing to copy to, so pinning becomes a no-op."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _guard_save(model: torch.nn.Module) -> None:
    """Wrap llm-compressor's ``save_pretrained`` so it sees the current config.

    Its wrapper re-reads ``config._name_or_path/config.json`` and writes that over the saved
    config (and looks for a recipe there, on the hub for a hub id). Pointing it at a folder with
    the current config keeps a changed architecture correct and keeps saving offline.
    """
    inner = model.save_pretrained
    if getattr(inner, "_flipcheck_config_guard", False):
        return

    @functools.wraps(inner)
    def save_pretrained(save_directory, *args, **kwargs):
        with _quiet_engine(), config_folder(model), warnings.catch_warnings():
            # llm-compressor hands the model to transformers as "offloaded" to save it; the
            # resulting warning about offloaded modules and shard sizes does not apply
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            return inner(save_directory, *args, **kwargs)

    save_pretrained._flipcheck_config_guard = True
    model.save_pretrained = save_pretrained


def run_oneshot(
    model: torch.nn.Module,
    calibration: Calibration,
    modifiers: list[Any],
    *,
    batch_size: int | None = None,
) -> None:
    """Run llm-compressor's ``oneshot`` with `modifiers` on `model`, in place.

    Checks shapes first, feeds ``calibration.input_ids`` (all samples, in order) when any
    modifier needs data, writes no files, and leaves the quantized weights materialized.
    `batch_size` defaults to min(samples, ``DEFAULT_BATCH_SIZE``).
    """
    if not modifiers:
        return
    with _quiet_engine():
        validate_modifiers(model, modifiers)
    kwargs: dict[str, Any] = {}
    if needs_data(modifiers):
        if calibration is None or calibration.input_ids is None:
            names = ", ".join(type(m).__name__ for m in modifiers if getattr(m, "requires_calibration_data", False))
            raise FlipcheckError(f"{names} needs calibration data, but none was prepared (set calibration.source)")
        ids = calibration.input_ids
        n, length = int(ids.shape[0]), int(ids.shape[1])
        kwargs.update(
            dataset=calibration.dataset(),
            num_calibration_samples=n,
            max_seq_length=length,
            shuffle_calibration_samples=False,
            batch_size=batch_size or min(n, DEFAULT_BATCH_SIZE),
        )
    from llmcompressor import oneshot

    tokenizer = calibration.tokenizer if calibration is not None else None
    was_training = model.training
    with _quiet_engine(), _no_pinning_without_accelerator(), config_folder(model):
        oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, output_dir=None, log_dir=None, **kwargs)
    model.train(was_training)
    materialize_quantized_weights(model)
    _guard_save(model)


@torch.no_grad()
def materialize_quantized_weights(model: torch.nn.Module) -> int:
    """Write each statically quantized Linear's fake-quantized weight into ``weight``.

    W <- s * (clamp(round(W / s) + z, qmin, qmax) - z), per group/channel/tensor, exactly as
    compressed-tensors' forward computes it; returns how many modules were written.
    """
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    count = 0
    for _, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        args = getattr(scheme, "weights", None)
        status = getattr(mod, "quantization_status", None)
        if args is None or status is None or args.dynamic or status >= QuantizationStatus.COMPRESSED:
            continue
        if not hasattr(mod, "weight_scale"):
            continue
        w = mod.weight
        w.data.copy_(forward_quantize(mod, w.data, "weight", args))
        count += 1
    return count


# --------------------------------------------------------------------------- measurements


def quantized_weight_bits(module: torch.nn.Module) -> float | None:
    """Bits one quantized Linear's weight takes in the checkpoint, or None if not quantized.

        bits = numel(W)·b + numel(scale)·bits(scale dtype) + [asymmetric] numel(zero point)·b
               + numel(global scale)·bits(its dtype) + numel(g_idx)·32

    b is the weight's num_bits; zero points are packed at b bits (compressed-tensors'
    pack-quantized format) and are not stored for symmetric schemes. For W4A16 with group 128 and
    fp16 scales that is 4 + 16/128 = 4.125 bits per weight; with fp32 scales 4.25.
    """
    args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
    if args is None or not hasattr(module, "weight_scale"):
        return None
    n = module.weight.numel()
    bits = n * args.num_bits
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


def quantization_parameter_count(model: torch.nn.Module) -> int:
    """Elements of the scale/zero-point tensors quantization attached (accounted as bits)."""
    seen, total = set(), 0
    for mod in model.modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if pname != "weight" and pname.startswith(("weight", "input", "output")) and pname.endswith(_QPARAM_SUFFIXES):
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel()
    return total


def measure(
    method: str,
    config: MethodConfig,
    model: torch.nn.Module,
    calibration: Calibration | None,
    *,
    used_calibration: bool,
) -> CompressionReport:
    """A CompressionReport read off the model's tensors after an llm-compressor step.

    bits_per_weight averages :func:`quantized_weight_bits` over the targeted Linears (weights
    left unquantized count their dtype's bits); sparsity is the fraction of exact zeros in those
    weights; parameters excludes the quantization scales/zero points (they are in the bits).
    """
    linears = targeted_linears(model)
    total_bits, total_n, quantized = 0.0, 0, 0
    for _, mod in linears:
        b = quantized_weight_bits(mod)
        if b is None:
            b = float(mod.weight.numel() * dtype_bits(mod.weight.dtype))
        else:
            quantized += 1
        total_bits += b
        total_n += mod.weight.numel()
    weights = [m.weight.data for _, m in linears]
    return CompressionReport(
        method=method,
        config=config.model_dump(),
        parameters=count_parameters(model) - quantization_parameter_count(model),
        bits_per_weight=total_bits / total_n if total_n else 0.0,
        sparsity=weight_sparsity(weights),
        calibration=calibration.describe() if (used_calibration and calibration is not None) else None,
        targeted=len(linears),
        extra={"quantized_linears": quantized},
    )


def apply_llmc(method: str, model: torch.nn.Module, config: MethodConfig, calibration: Calibration) -> CompressionReport:
    """``run_oneshot(model, calibration, modifiers_for(method, config, model))`` plus the report."""
    modifiers = modifiers_for(method, config, model)
    run_oneshot(model, calibration, modifiers)
    return measure(method, config, model, calibration, used_calibration=needs_data(modifiers))


def apply_chain(
    model: torch.nn.Module, steps: list[tuple[str, MethodConfig]], calibration: Calibration
) -> list[CompressionReport]:
    """Run consecutive llm-compressor steps (e.g. wanda 2:4 then gptq) in ONE oneshot.

    The modifiers run in order, each with its own calibration pass over the data as it stands
    after the previous one (llm-compressor's "independent" pipeline), so the result equals
    running the steps one by one. Each step's report is measured on the model after the whole
    chain; the chain's wall time is on the first report (the others carry 0.0), and every report
    names the chain in ``extra["oneshot_chain"]``.
    """
    per_step = [modifiers_for(name, cfg, model) for name, cfg in steps]
    t0 = time.perf_counter()
    run_oneshot(model, calibration, [m for mods in per_step for m in mods])
    elapsed = time.perf_counter() - t0
    names = [name for name, _ in steps]
    reports = []
    for i, ((name, cfg), mods) in enumerate(zip(steps, per_step, strict=True)):
        report = measure(name, cfg, model, calibration, used_calibration=needs_data(mods))
        report.wall_time_s = elapsed if i == 0 else 0.0
        report.extra["oneshot_chain"] = names
        reports.append(report)
    return reports
