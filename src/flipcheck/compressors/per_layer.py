"""Per-layer settings: a map from decoder-layer ranges to a value (a scheme, a sparsity).

    layers: {"0-3": W8A16, "4-29": W4A16}          # recipe YAML
    --set layers=0-3:W8A16,4-29:W4A16               # command line (RANGE:VALUE, comma-separated)

A key is a layer index ("5") or an inclusive range ("0-3"); ranges must not overlap. Layers the map
does not name keep the step's own setting. Keys are written back in canonical form (sorted, "a-b"
or "a"), so two spellings of the same map record and key the same child. Indices are checked
against the model's layer count when the step runs (the count is not known before).

For the quantizers the map becomes llm-compressor ``config_groups``: one group per distinct scheme,
whose ``targets`` is one regex naming exactly the Linear modules of its layers
(``re:^model\\.layers\\.(0|1|2|3)\\.(self_attn\\.q_proj|...)$``), so the saved
``quantization_config`` says per module which scheme it holds; "none" leaves the layers' Linears
unquantized (added to ``ignore``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flipcheck.errors import FlipcheckError

_KEY = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
#: the value that leaves a layer's Linears as they are (quantizers)
KEEP = "none"


def parse_range(key: Any) -> tuple[int, int]:
    """'3' -> (3, 3), '0-3' -> (0, 3) (inclusive); a ValueError naming the allowed forms otherwise."""
    m = _KEY.match(str(key))
    if not m:
        raise ValueError(f"layer range {key!r}: expected an index (5) or an inclusive range (0-3)")
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if hi < lo:
        raise ValueError(f"layer range {key!r}: the end is below the start; write it as {hi}-{lo}")
    return lo, hi


def _canonical(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def parse_layer_map(value: Any, convert: Callable[[Any], Any]) -> dict[str, Any] | None:
    """A layer map from a mapping, a JSON/YAML mapping text or 'RANGE:VALUE,RANGE:VALUE' text, with
    each value passed through `convert` (which raises ValueError naming the allowed values).

    Returns a dict with canonical, sorted keys; None for None or an empty text. Overlapping ranges
    are a ValueError.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"layers {text!r}: not a mapping ({err})") from None
        else:
            pairs = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                if ":" not in part:
                    raise ValueError(f"layers {text!r}: expected RANGE:VALUE pairs separated by commas, e.g. 0-3:W8A16,4-29:W4A16")
                k, v = part.split(":", 1)
                if k.strip() in pairs:
                    raise ValueError(f"layers {text!r}: range {k.strip()} is given twice")
                pairs[k.strip()] = v.strip()
            value = pairs
    if not isinstance(value, Mapping):
        raise ValueError(f"layers must map layer ranges to values, e.g. {{'0-3': ..., '4-29': ...}}; got {value!r}")
    spans = sorted((parse_range(k), convert(v)) for k, v in value.items())
    for (a, _), (b, _) in zip(spans, spans[1:], strict=False):
        if b[0] <= a[1]:
            raise ValueError(f"layers: ranges {_canonical(*a)} and {_canonical(*b)} overlap; give each layer once")
    return {_canonical(lo, hi): v for (lo, hi), v in spans} or None


def expand(layer_map: Mapping[str, Any] | None, num_layers: int, setting: str = "layers") -> dict[int, Any]:
    """{layer index: value} for the layers the map names; an index >= num_layers is an error."""
    out: dict[int, Any] = {}
    for key, v in (layer_map or {}).items():
        lo, hi = parse_range(key)
        if hi >= num_layers:
            raise FlipcheckError(f"{setting}: range {key} names layer {hi}, but the model has {num_layers} decoder "
                                 f"layers; allowed: 0-{num_layers - 1}")
        out.update({i: v for i in range(lo, hi + 1)})
    return out


def json_key(layer_map: Mapping[str, Any] | None) -> str:
    return json.dumps(layer_map or {}, sort_keys=True)


def decoder_linears(model: torch.nn.Module) -> tuple[str, list[list[str]]]:
    """(dotted path of the decoder layer list, [[Linear names relative to layer i] for each layer i])."""
    from flipcheck.compressors.architectures import adapter_for

    adapter = adapter_for(model)
    names = [[n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)] for layer in adapter.layer_list]
    return adapter.spec.layers, names


def module_regex(prefix: str, indices: list[int], suffixes: list[str]) -> str:
    """``re:`` target naming exactly the modules PREFIX.i.SUFFIX for i in `indices` (compressed-tensors form)."""
    idx = "|".join(str(i) for i in sorted(indices))
    suf = "|".join(re.escape(s) for s in sorted(set(suffixes)))
    return f"re:^{re.escape(prefix)}\\.({idx})\\.({suf})$"


def group_layers(model: torch.nn.Module, layer_map: Mapping[str, Any] | None, default: Any,
                 setting: str = "layers") -> list[tuple[Any, str | None, list[int]]]:
    """[(value, target regex or None when no layer has it, [layer indices])], one per distinct value;
    every decoder layer the map does not name takes `default`. Values in order of first layer."""
    prefix, names = decoder_linears(model)
    per = expand(layer_map, len(names), setting)
    groups: dict[Any, list[int]] = {}
    for i in range(len(names)):
        groups.setdefault(per.get(i, default), []).append(i)
    out = []
    for value, idx in groups.items():
        suffixes = [s for i in idx for s in names[i]]
        out.append((value, module_regex(prefix, idx, suffixes) if suffixes else None, idx))
    return out
