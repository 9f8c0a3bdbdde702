"""Loaders for children that need flipcheck's help to load, by the name their ``flipcheck.json``
gives (``"loader": "slicegpt"``).

A method module registers its loader here (``register_loader("bnb", load_bnb_child)``);
``flipcheck.models`` looks loaders up here. Neither imports the other: a name not registered yet
is found through the built-in table below (the module whose import registers it), then through
the ``flipcheck.loaders`` entry-point group, where a plug-in can name its own
(``name = "package.module:function"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import torch

# (folder, provenance, device, dtype) -> model; device "auto" asks for device_map="auto" (spread over the GPUs)
Loader = Callable[[Path, dict, torch.device | str, torch.dtype], torch.nn.Module]

_LOADERS: dict[str, Loader] = {}
# Built-in loaders: the module whose import registers each one.
_BUILTIN = {"bnb": "flipcheck.compressors.bnb", "slicegpt": "flipcheck.compressors.slicegpt"}


def register_loader(name: str, loader: Loader) -> None:
    """Register how to rebuild a child whose ``flipcheck.json`` says ``"loader": name``."""
    _LOADERS[name] = loader


def get_loader(name: str) -> Loader | None:
    """The loader registered under `name` (importing its module if needed), or None."""
    if name not in _LOADERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _LOADERS:
        for ep in entry_points(group="flipcheck.loaders"):
            if ep.name == name:
                _LOADERS[name] = ep.load()
    return _LOADERS.get(name)


def loader_names() -> list[str]:
    return sorted(set(_LOADERS) | set(_BUILTIN))
