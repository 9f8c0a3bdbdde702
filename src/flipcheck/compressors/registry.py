"""The compressor interface: a method is a config model plus one function, registered by name.

    register("noise", NoiseConfig, apply_noise, needs_calibration=False)

``apply(model, config, calibration) -> CompressionReport`` changes `model` in place. Configs are
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

from flipcheck.errors import FlipcheckError, suggest


class MethodConfig(BaseModel):
    """Base of every method's settings: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class CompressionReport:
    """What a method did, measured on the tensors it produced."""

    method: str
    config: dict[str, Any]
    parameters: int = 0  # parameters of the whole model after the step
    bits_per_weight: float = 0.0  # average over the targeted Linear weights (32/16 when untouched)
    sparsity: float = 0.0  # fraction of zeros among the targeted Linear weights
    wall_time_s: float = 0.0
    calibration: dict[str, Any] | None = None  # source, samples, length, seed; None if unused
    targeted: int = 0  # number of Linear weights the step changed
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ApplyFn = Callable[[torch.nn.Module, MethodConfig, Any], CompressionReport]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    needs_calibration: bool | Callable[[MethodConfig], bool]  # a function when it depends on the settings
    description: str

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


def register(
    name: str,
    config_cls: type[MethodConfig],
    apply: ApplyFn,
    *,
    needs_calibration: bool | Callable[[MethodConfig], bool] = False,
    description: str = "",
) -> Method:
    """Register a compression method under `name` (one explicit line per method)."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    m = Method(name, config_cls, apply, needs_calibration, description or (config_cls.__doc__ or "").strip().splitlines()[0])
    _METHODS[name] = m
    return m


def methods() -> dict[str, Method]:
    import flipcheck.compressors  # noqa: F401  (registers the bundled methods)

    return dict(_METHODS)


def get_method(name: str) -> Method:
    all_methods = methods()
    if name not in all_methods:
        raise FlipcheckError(
            f"unknown method {name!r}; allowed: {', '.join(sorted(all_methods))}." + suggest(name, all_methods)
        )
    return all_methods[name]


def format_validation_error(method: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(settings)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown setting {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"{method}: " + "; ".join(parts)


def make_config(name: str, settings: Mapping[str, Any] | None = None) -> MethodConfig:
    """Validate `settings` (values may be strings from the command line) into `name`'s config."""
    method = get_method(name)
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
