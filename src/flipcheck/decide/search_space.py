"""What a search may choose per decoder layer, and how a choice per layer becomes one step's settings.

A *space* is a method with a list of per-layer options:

- quantizers (``rtn``, ``gptq``, ``awq``): ``--choices scheme=W4A16,W8A16[,none]`` (awq: W4A16_ASYM, W4A16, W8A16), a preset scheme per
  layer, ``none`` leaving the layer unquantized; the step gets ``scheme`` (the most common choice)
  and a ``layers`` map for the rest (:mod:`flipcheck.compressors.per_layer`);
- pruners (``wanda``, ``sparsegpt``): ``--choices sparsity=0.3,0.5[,0]``, a sparsity per layer,
  0 leaving it dense; the step gets ``sparsity`` and a ``layers`` map;
- ``layer_drop``: keep or drop each layer (no ``--choices``); the step gets ``layers`` (the list
  dropped).

Size is what :func:`flipcheck.compressors.stats.measure` reads off the child: the bits the decoder
Linears' weights take in storage (``storage_bits``). For the pruners it is the bits of the nonzero
weights, ``storage_bits · (1 − sparsity)`` (a sparse format's payload, its index bits not counted),
since a dense checkpoint of a pruned model is as large as its parent's.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flipcheck.errors import FlipcheckError

QUANTIZERS = ("rtn", "gptq", "awq")
PRUNERS = ("wanda", "sparsegpt")
DROP = "layer_drop"
SEARCHABLE = (*QUANTIZERS, *PRUNERS, DROP)
_KEY = {**dict.fromkeys(QUANTIZERS, "scheme"), **dict.fromkeys(PRUNERS, "sparsity")}


@dataclass(frozen=True)
class Choice:
    """One per-layer option: its label (as the user wrote it, canonical), the setting value, and
    whether it leaves the layer as the parent's (``none``, sparsity 0, keep)."""

    label: str
    value: Any
    keep: bool


@dataclass(frozen=True)
class Space:
    method: str
    key: str  # the setting a choice sets: scheme, sparsity, or "drop" for layer_drop
    choices: tuple[Choice, ...]
    fixed: dict[str, Any]  # the step's other settings (--set), the same for every candidate

    @property
    def compressing(self) -> list[Choice]:
        """The choices that change a layer (each gets a uniform child)."""
        return [c for c in self.choices if not c.keep]

    def labels(self) -> list[str]:
        return [c.label for c in self.choices]

    def settings(self, allocation: Sequence[int]) -> dict[str, Any] | None:
        """The step's settings for one choice index per layer; None when that is no child: every
        layer keeps the parent's (the parent itself), or layer_drop would drop every layer."""
        chosen = [self.choices[k] for k in allocation]
        if all(c.keep for c in chosen) or (self.method == DROP and not any(c.keep for c in chosen)):
            return None
        if self.method == DROP:
            return {**self.fixed, "layers": [i for i, c in enumerate(chosen) if not c.keep]}
        counts = Counter(k for k in allocation if not self.choices[k].keep)
        default = max(counts, key=lambda k: (counts[k], -k))  # the most common change; ties: the first listed
        per = {i: self.choices[k].value for i, k in enumerate(allocation) if k != default}
        return {**self.fixed, self.key: self.choices[default].value, "layers": ranges(per) or None}

    def uniform(self, choice: int, num_layers: int) -> list[int]:
        return [choice] * num_layers

    def describe(self, allocation: Sequence[int]) -> str:
        """'W4A16 ×20, W8A16 ×10' (choice counts in the listed order)."""
        counts = Counter(allocation)
        return ", ".join(f"{self.choices[k].label} ×{counts[k]}" for k in range(len(self.choices)) if counts[k])


def ranges(per_layer: Mapping[int, Any]) -> dict[str, Any]:
    """{layer: value} -> {'a-b': value} over runs of consecutive layers with equal values."""
    out: dict[str, Any] = {}
    items = sorted(per_layer.items())
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][0] == items[j][0] + 1 and items[j + 1][1] == items[i][1]:
            j += 1
        lo, hi = items[i][0], items[j][0]
        out[str(lo) if lo == hi else f"{lo}-{hi}"] = items[i][1]
        i = j + 1
    return out


def parse_space(method: str, choices: str | None, fixed: Mapping[str, Any] | None = None) -> Space:
    """The search space of `method` from ``KEY=V1,V2,...``; one-line errors name what is allowed."""
    from flipcheck.compressors.per_layer import KEEP
    from flipcheck.compressors.registry import make_config

    fixed = dict(fixed or {})
    if method not in SEARCHABLE:
        raise FlipcheckError(f"search --method {method!r}: allowed are {', '.join(SEARCHABLE)} "
                             "(the methods that take per-layer settings)")
    if "layers" in fixed:
        raise FlipcheckError("search: --set layers=... is what the search chooses; leave it out")
    if method == DROP:
        if choices:
            raise FlipcheckError(f"search --method {DROP} chooses which layers to drop (keep or drop each); it takes no --choices")
        for k in ("n", "fraction"):
            if k in fixed:
                raise FlipcheckError(f"search --method {DROP}: --set {k} conflicts with the layers the search drops; leave it out")
        return Space(method, "drop", (Choice("keep", False, True), Choice("drop", True, False)), fixed)
    key = _KEY[method]
    if not choices or "=" not in choices:
        raise FlipcheckError(f"search --method {method} needs --choices {key}=V1,V2,... "
                             f"(e.g. {'scheme=W4A16,W8A16' if key == 'scheme' else 'sparsity=0.3,0.5'})")
    name, _, values = choices.partition("=")
    if name.strip() != key:
        raise FlipcheckError(f"search --choices {choices!r}: {method} chooses {key} per layer; write {key}=V1,V2,...")
    out: list[Choice] = []
    for raw in (v.strip() for v in values.split(",")):
        if not raw:
            continue
        if key == "scheme" and raw.lower() == KEEP:
            out.append(Choice(KEEP, KEEP, True))
            continue
        try:
            cfg = make_config(method, {**fixed, key: raw})
        except FlipcheckError as err:
            raise FlipcheckError(f"search --choices {key}={raw}: {err}") from None
        value = getattr(cfg, key)
        out.append(Choice(str(value), value, key == "sparsity" and value == 0))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise FlipcheckError(f"search --choices {choices!r}: a value is given twice ({', '.join(labels)})")
    if not any(not c.keep for c in out):
        raise FlipcheckError(f"search --choices {choices!r}: give at least one {key} that compresses")
    if len(out) < 2:
        raise FlipcheckError(f"search --choices {choices!r}: give at least two options per layer "
                             f"(e.g. {key}={out[0].label},{'none' if key == 'scheme' else '0'})")
    return Space(method, key, tuple(out), fixed)


def size_bits(method: str, report: Mapping[str, Any]) -> float | None:
    """A child's size (module docstring) from its last compression report (``stats.measure``'s figures)."""
    extra = report.get("extra") or {}
    bits = extra.get("storage_bits")
    if bits is None:
        return None
    if method in PRUNERS:
        return float(bits) * (1.0 - float(report.get("sparsity") or 0.0))
    return float(bits)


def digest(data: Any) -> str:
    """A stable key of JSON-like data (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
