"""Static checks of a compression plan: what is bound to fail is found before any model or data loads.

A plan is a parent, an ordered list of steps, and a calibration config. In order:

1. each step's method and settings (the config validators: names, ranges, schemes and their
   serving layouts) and the chain's model kinds (:func:`registry.check_chain`);
2. shapes, from the parent's ``config.json`` alone (:func:`architectures.linear_widths`):
   group-wise quantization needs every targeted Linear's ``in_features`` to be a multiple of the
   group size, and an N:M mask a multiple of M;
3. the calibration source, when some step needs data: it must exist, and offline a hub dataset
   must be in the local cache (:func:`calibration_data.check_reachable`).

The same shape checks run again on the loaded model (:func:`llmc.validate_modifiers`), which
also covers architectures whose widths cannot be read from their config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flipcheck.compressors.architectures import linear_widths
from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import check_reachable, resolve_calibration
from flipcheck.compressors.llmc import _strategy, check_group_sizes, check_mask, modifiers_for
from flipcheck.compressors.registry import MethodConfig, get_method

log = logging.getLogger(__name__)

Step = tuple[str, MethodConfig]


def parent_config(source: Any) -> dict[str, Any] | None:
    """The parent's ``config.json`` as a dict (a :class:`~flipcheck.models.ModelSource`); None when absent
    or unreadable (the model's own loader then says what is wrong)."""
    folder = source.local_folder(weights=False)
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _group_sizes(modifier: Any) -> set[int]:
    config = getattr(modifier, "resolved_config", None)
    sizes: set[int] = set()
    for scheme in (config.config_groups.values() if config is not None else ()):
        w = scheme.weights
        if w is not None and _strategy(w) in ("group", "tensor_group") and w.group_size:
            sizes.add(int(w.group_size))
    return sizes


def check_shapes(steps: Sequence[Step], config: Mapping[str, Any]) -> None:
    """Group sizes and N:M masks of llm-compressor steps against the widths `config` implies.

    Every flipcheck llm-compressor step targets every decoder Linear but the output head, so the
    widths of :func:`linear_widths` are its targets. Nothing is checked for an architecture whose
    widths cannot be read from the config.
    """
    layers = linear_widths(config)
    if not layers:
        return
    for name, cfg in steps:
        if get_method(name).modifiers is None:
            continue
        if getattr(cfg, "layers", None):  # per-layer schemes name each layer's Linears: they need the model;
            cfg = cfg.model_copy(update={"layers": None})  # the step's own group size is checked here, the rest on load
        for mod in modifiers_for(name, cfg):
            for size in sorted(_group_sizes(mod)):
                check_group_sizes(layers, size, setting=f"{name} group_size")
            n_m = getattr(mod, "mask_structure", None)
            if n_m and n_m != "0:0":
                n, m = (int(x) for x in n_m.split(":"))
                check_mask(layers, m, f"{m - n}:{m}")


def check_plan(steps: Sequence[Step], source: Any, calibration: CalibrationConfig | None) -> None:
    """Shapes (from the config of `source`, a resolved parent) and, when some step needs data, the
    calibration source (`calibration.source`; None: the parent's default). Steps are validated
    configs (:func:`pipeline.validate_steps`)."""
    config = parent_config(source)
    if config is not None:
        check_shapes(steps, config)
    if any(get_method(n).needs_data(c) for n, c in steps):
        check_reachable(resolve_calibration(calibration, source.folder).source)
