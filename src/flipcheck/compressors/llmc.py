"""The shared runner for the methods whose engine is llm-compressor's ``oneshot``.

gptq, awq, smoothquant, rtn, wanda and sparsegpt each describe their work as a list of
llm-compressor modifiers, built by the function they register with
(``register(name, Config, modifiers=build)``, see :func:`modifiers_for`); :func:`apply_llmc` is
their one apply, and :func:`run_oneshot` runs any such list on a
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
import dataclasses
import functools
import inspect
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

from flipcheck.compressors.calibration import Calibration
from flipcheck.compressors.registry import (
    CompressionReport,
    MethodConfig,
    get_method,
    methods,
    register_modifier_runner,
    require_llmcompressor,
)
from flipcheck.compressors.stats import step_report, targeted_linears
from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)

# Calibration batch size: samples all share one length, so batching changes no statistic (up to
# float rounding); on CPU a batch of 16 runs GPTQ ~4x and AWQ ~8x faster than the default of 1.
DEFAULT_BATCH_SIZE = 16
# Group sizes suggested when a requested one does not divide a layer's width.
_GROUP_CANDIDATES = (32, 64, 128, 256, 512, 1024)


def llmc_methods() -> list[str]:
    return sorted(n for n, m in methods().items() if m.modifiers is not None)


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
    build = get_method(name).modifiers
    if build is not None:
        require_llmcompressor(name)
    if build is None:
        raise FlipcheckError(f"{name!r} is not an llm-compressor method; allowed: {', '.join(llmc_methods())}")
    # builders with per-layer settings take the model too, to name the Linears of each layer
    extra = {"model": model} if "model" in inspect.signature(build).parameters else {}
    with _quiet_engine():  # building modifiers already logs (device probes)
        return build(config, head_name(model) if model is not None else "lm_head", **extra)


def layer_layout(preset: str, group_size: int | str | None) -> int | str | None:
    """The weight layout a per-layer `preset` gets from its step's `group_size`: that group size,
    unless the preset cannot take it (a fixed layout, or W8A8's per-channel serving layout), then
    its own preset layout ("preset")."""
    if group_size == "preset" or not regroupable(preset):
        return "preset"
    try:
        check_serving_layout(preset, group_size)
    except ValueError:
        return "preset"
    return group_size


def quant_groups(
    scheme: str, group_size: int | str | None, layers: dict[str, str] | None, model: torch.nn.Module | None,
    head: str,
) -> tuple[dict[str, Any], list[str]]:
    """(config_groups, ignore) of a quantization modifier: one group of `scheme` on every Linear,
    or with per-layer `layers` ({range: preset or "none"}, see :mod:`per_layer`) one group per
    distinct scheme whose targets name exactly its layers' Linears; "none" layers go to `ignore`."""
    from flipcheck.compressors.per_layer import KEEP, group_layers

    if not layers:
        return {"group_0": quant_scheme(scheme, group_size)}, [head]
    if model is None:
        raise FlipcheckError("per-layer schemes (layers=...) need the model to name each layer's Linears")
    groups, ignore = {}, [head]
    for value, target, _ in group_layers(model, layers, scheme):
        if target is None:
            continue
        if value == KEEP:
            ignore.append(target)
            continue
        layout = group_size if value == scheme else layer_layout(value, group_size)
        groups[f"group_{len(groups)}"] = quant_scheme(value, layout, targets=[target])
    if not groups:
        raise FlipcheckError("layers: every decoder layer is 'none'; quantize at least one layer")
    return groups, ignore


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


def preset_group_size(preset: str) -> int | None:
    """The group size of a preset's weights; None when they are per channel or per tensor."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    w = PRESET_SCHEMES[preset].get("weights")
    return int(w.group_size) if w is not None and _strategy(w) == "group" and w.group_size else None


def check_serving_layout(preset: str, group_size: int | str | None) -> None:
    """Refuse a weight layout that the serving kernels of `preset` do not run (a ValueError, for
    the config validators).

    Presets with integer weights per output channel and dynamic per-token integer activations
    (W8A8, INT8) are what vLLM's int8 GEMM kernels run; they take per-channel or per-tensor
    weight scales, never groups.
    """
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if not isinstance(group_size, int) or isinstance(group_size, bool):
        return
    spec = PRESET_SCHEMES[preset]
    w, a = spec.get("weights"), spec.get("input_activations")
    kind = lambda args: getattr(args.type, "value", args.type)  # noqa: E731
    if w is not None and a is not None and _strategy(w) == "channel" and kind(w) == "int" and kind(a) == "int":
        raise ValueError(
            f"scheme {preset} (int8 weights and per-token int8 activations) needs per-channel weights, which "
            f"vLLM's W8A8 kernels run; group_size={group_size} is not allowed; allowed: group_size=None (per channel)"
        )


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


# --------------------------------------------------------------------------- applying methods


def apply_llmc(method: str, model: torch.nn.Module, config: MethodConfig, calibration: Calibration) -> CompressionReport:
    """Every llm-compressor method's apply: ``run_oneshot(model, calibration, modifiers_for(...))``
    plus the report. A config may name what to do without data (``no_data_hint``)."""
    modifiers = modifiers_for(method, config, model)
    with _quiet_engine():
        validate_modifiers(model, modifiers)  # shapes first: they fail whatever the data
    if needs_data(modifiers) and (calibration is None or calibration.input_ids is None):
        hint = getattr(config, "no_data_hint", "") or "give the step calibration data (calibration.source)"
        raise FlipcheckError(f"{method} needs calibration data with these settings, but none was prepared; {hint}")
    run_oneshot(model, calibration, modifiers)
    return measure(method, config, model, calibration, used_calibration=needs_data(modifiers))


def measure(
    method: str, config: MethodConfig, model: torch.nn.Module, calibration: Calibration | None, *, used_calibration: bool
) -> CompressionReport:
    """The step's report, its figures read off the model (:func:`stats.step_report`)."""
    used = used_calibration and calibration is not None
    return step_report(
        method, config, model, targeted=len(targeted_linears(model)), calibration=calibration.describe() if used else None
    )


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
    first = measure(names[0], steps[0][1], model, calibration, used_calibration=needs_data(per_step[0]))
    reports = []
    for i, ((name, cfg), mods) in enumerate(zip(steps, per_step, strict=True)):
        # the model is the same after every step of the chain: measured once, reported per step
        used = needs_data(mods) and calibration is not None
        report = dataclasses.replace(
            first, method=name, config=cfg.model_dump(), calibration=calibration.describe() if used else None,
            extra={**first.extra, "oneshot_chain": names},
        )
        report.wall_time_s = elapsed if i == 0 else 0.0
        reports.append(report)
    return reports


def regroupable(scheme: str) -> bool:
    """True when the preset's weights are integer group- or channel-wise, so group_size may change."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    w = PRESET_SCHEMES[scheme].get("weights")
    if w is None:
        return False
    strategy = getattr(w.strategy, "value", w.strategy)
    kind = getattr(w.type, "value", w.type)
    return kind == "int" and strategy in ("group", "channel")


register_modifier_runner(apply_llmc)
