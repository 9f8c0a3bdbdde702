"""The compressor interface: a method is a config model plus one function, registered by name.

    register("noise", NoiseConfig, apply_noise, needs_calibration=False)
    register("gptq", GPTQConfig, modifiers=gptq_modifiers, needs_calibration=True)

``apply(model, config, calibration) -> CompressionReport`` changes `model` in place. Methods whose
engine is llm-compressor give, instead of `apply`, the function that builds their llm-compressor
modifiers, ``modifiers(config, head_name) -> list``; one shared runner (``llmc.apply_llmc``)
applies any of them, and consecutive such steps share one ``oneshot``. Configs are
pydantic models with ``extra="forbid"`` and validated ranges, so a bad setting fails before any
work, with a message that names the setting and the allowed values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from flipcheck.errors import FlipcheckError, format_validation_error, suggest


class MethodConfig(BaseModel):
    """Base of every method's settings: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def none_from_text(value: Any) -> Any:
    """'None'/'null'/'' (as typed on a command line or in YAML) -> None; anything else unchanged."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    return value


@dataclass
class CompressionReport:
    """What a method did, measured on the tensors it produced."""

    method: str
    config: dict[str, Any]
    # the three figures below are read off the model the step leaves (stats.measure)
    parameters: int = 0  # logical parameters of the whole model (unpacked weights; no scales)
    bits_per_weight: float = 0.0  # storage bits (scales included) per decoder Linear weight
    sparsity: float = 0.0  # fraction of zeros among the decoder Linear weights (dequantized)
    wall_time_s: float = 0.0
    calibration: dict[str, Any] | None = None  # source, samples, length, seed; None if unused
    targeted: int = 0  # number of Linear weights the step changed
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ApplyFn = Callable[[torch.nn.Module, MethodConfig, Any], CompressionReport]
ModifierBuilder = Callable[[MethodConfig, str], list]  # (config, output head's name) -> llm-compressor modifiers


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    needs_calibration: bool | Callable[[MethodConfig], bool]  # a function when it depends on the settings
    description: str
    # Chains: the model kinds this method can take as input, and the kind it leaves (None: the
    # kind it was given). Kinds: see MODEL_KINDS.
    accepts: frozenset[str] = frozenset({"dense", "sparse"})
    produces: str | None = None
    # llm-compressor methods: builds the modifiers that carry the method out (None: own code)
    modifiers: ModifierBuilder | None = None

    def needs_data(self, config: MethodConfig) -> bool:
        n = self.needs_calibration
        return bool(n(config) if callable(n) else n)

    def settings(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) of each setting, for `flipcheck list`."""
        rows = []
        for key, f in self.config_cls.model_fields.items():
            ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            rows.append((key, ann, default, f.description or ""))
        return rows


_METHODS: dict[str, Method] = {}

# What a model is between two steps of a chain; each method says which kinds it takes and leaves.
MODEL_KINDS = {
    "dense": "floating-point weights, stock structure (a parent)",
    "sparse": "floating-point weights with pruned zeros (wanda, sparsegpt)",
    "sliced": "SliceGPT's rotated, narrower structure with shortcut matrices",
    "quantized": "llm-compressor quantized weights (gptq, awq, smoothquant, rtn)",
    "bnb": "bitsandbytes packed int8/4-bit weights",
    "gguf": "a GGUF file quantized by llama.cpp (nothing follows it)",
}


def register(
    name: str,
    config_cls: type[MethodConfig],
    apply: ApplyFn | None = None,
    *,
    modifiers: ModifierBuilder | None = None,
    needs_calibration: bool | Callable[[MethodConfig], bool] = False,
    description: str = "",
    accepts: frozenset[str] | set[str] = frozenset({"dense", "sparse"}),
    produces: str | None = None,
) -> Method:
    """Register a compression method under `name` (one explicit line per method).

    Give `apply` (own code) or `modifiers` (an llm-compressor method, run by the shared runner).

    `accepts`: the model kinds (:data:`MODEL_KINDS`) the method can follow; `produces`: the kind
    it leaves, None when it keeps the kind it was given (layer dropping keeps a sparse model sparse).
    """
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if (apply is None) == (modifiers is None):
        raise ValueError(f"method {name!r}: give either apply or modifiers")
    apply = apply or _oneshot_apply(name)
    unknown = (set(accepts) | {produces or "dense"}) - set(MODEL_KINDS)
    if unknown:
        raise ValueError(f"method {name!r}: unknown model kinds {sorted(unknown)}; allowed: {', '.join(MODEL_KINDS)}")
    m = Method(
        name, config_cls, apply, needs_calibration, description or (config_cls.__doc__ or "").strip().splitlines()[0],
        accepts=frozenset(accepts), produces=produces, modifiers=modifiers,
    )
    _METHODS[name] = m
    return m


_MODIFIER_RUNNER: list[Any] = []  # the one runner of llm-compressor modifiers: llmc.apply_llmc registers it


def register_modifier_runner(fn) -> None:
    """``fn(name, model, config, calibration) -> CompressionReport`` runs the modifiers of every method
    registered with ``modifiers`` (llm-compressor's oneshot, :func:`flipcheck.compressors.llmc.apply_llmc`)."""
    _MODIFIER_RUNNER[:] = [fn]


def _oneshot_apply(name: str) -> ApplyFn:
    def apply(model: torch.nn.Module, config: MethodConfig, calibration: Any) -> CompressionReport:
        if not _MODIFIER_RUNNER:
            import flipcheck.compressors  # noqa: F401 - the bundled methods, llm-compressor's runner among them
        return _MODIFIER_RUNNER[0](name, model, config, calibration)

    apply.__doc__ = f"Run {name}'s llm-compressor modifiers on `model` in place (llmc.apply_llmc)."
    return apply


def methods() -> dict[str, Method]:
    import flipcheck.compressors  # noqa: F401  (registers the bundled methods)

    return dict(_METHODS)


COMPRESS_HINT = 'pip install "flipcheck[compress]"'


def require_llmcompressor(method: str) -> None:
    """An llm-compressor method without llm-compressor installed fails in one line naming the pip command
    (the `compress` extra: left out where vLLM pins another compressed-tensors)."""
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is None or importlib.util.find_spec("compressed_tensors") is None:
        raise FlipcheckError(f"method {method!r} runs on llm-compressor, which is not installed: {COMPRESS_HINT}")


def get_method(name: str) -> Method:
    all_methods = methods()
    if name not in all_methods:
        raise FlipcheckError(
            f"unknown method {name!r}; allowed: {', '.join(sorted(all_methods))}." + suggest(name, all_methods)
        )
    return all_methods[name]


def make_config(name: str, settings: Mapping[str, Any] | None = None) -> MethodConfig:
    """Validate `settings` (values may be strings from the command line) into `name`'s config."""
    method = get_method(name)
    if method.modifiers is not None:
        require_llmcompressor(name)
    settings = dict(settings or {})
    try:
        return method.config_cls(**settings)
    except ValidationError as err:
        allowed = ", ".join(method.config_cls.model_fields)
        raise FlipcheckError(format_validation_error(name, err) + f". Settings of {name}: {allowed}") from err


def parse_set_options(pairs: list[str] | None) -> dict[str, str]:
    """['sigma=0.05', 'seed=1'] -> {'sigma': '0.05', 'seed': '1'} (pydantic coerces the types)."""
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise FlipcheckError(f"--set {p!r}: expected key=value")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def timed_apply(method: Method, model: torch.nn.Module, config: MethodConfig, calibration: Any) -> CompressionReport:
    t0 = time.perf_counter()
    report = method.apply(model, config, calibration)
    report.wall_time_s = time.perf_counter() - t0
    return report


def check_chain(names: list[str]) -> list[str]:
    """The model kind after each step of a chain starting from a dense parent.

    Raises a one-line FlipcheckError naming the first pair that cannot follow and the methods
    that may follow there (e.g. slicegpt then gptq: SliceGPT's shortcut matrices and structure are
    not something a quantizer or its saved format knows about).
    """
    all_methods = methods()
    kind, kinds = "dense", []
    for i, name in enumerate(names):
        method = get_method(name)
        if kind not in method.accepts:
            before = names[i - 1] if i else "the parent"
            allowed = sorted(n for n, m in all_methods.items() if kind in m.accepts)
            raise FlipcheckError(
                f"chain {' -> '.join(names)}: {name} cannot follow {before} ({name} takes a "
                f"{' or '.join(sorted(method.accepts))} model, {before} leaves a {kind} one); "
                f"allowed after {before}: {', '.join(allowed) or 'nothing (it must be the last step)'}"
            )
        kind = method.produces or kind
        kinds.append(kind)
    return kinds
