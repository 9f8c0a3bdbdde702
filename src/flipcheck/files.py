"""Writing results so that nothing a user computed is lost, and values JSON can hold.

Every file flipcheck writes goes through a temporary file in the same folder and a rename, so a
crash or Ctrl-C never leaves a half-written report, provenance file or memo that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def packaged_task_dir() -> Path:
    """The lm-eval task folder that ships with flipcheck (the demo's tasks)."""
    return Path(__file__).resolve().parent / "data" / "demo_task"


def cache_root() -> Path:
    """flipcheck's cache folder: ``$FLIPCHECK_CACHE``, else ``~/.cache/flipcheck``."""
    return Path(os.environ.get("FLIPCHECK_CACHE") or Path.home() / ".cache" / "flipcheck").expanduser()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON to `path`, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def jsonable(x: Any, *, nonfinite: str = "null") -> Any:
    """Plain JSON values: numpy -> Python, tuples -> lists, objects with ``to_dict`` -> dicts.

    NaN/inf become None with ``nonfinite="null"`` (reports: JSON has no NaN) or a marked value
    ``{"__float__": "nan" | "inf" | "-inf"}`` with ``nonfinite="text"`` (caches that read them back
    with :func:`restore_floats`; a generated text "nan" stays text). Anything else unknown becomes
    its ``str``.
    """
    if hasattr(x, "to_dict") and callable(x.to_dict):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): jsonable(v, nonfinite=nonfinite) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v, nonfinite=nonfinite) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:
        x = x.item()
    if hasattr(x, "tolist") and callable(x.tolist):
        return jsonable(x.tolist(), nonfinite=nonfinite)
    if isinstance(x, float) and not math.isfinite(x):
        return None if nonfinite == "null" else {_FLOAT: repr(x)}
    if x is None or isinstance(x, str | int | float | bool):
        return x
    return str(x)


_FLOAT = "__float__"


def restore_floats(x: Any) -> Any:
    """Undo ``jsonable(..., nonfinite="text")``: each ``{"__float__": "nan"}`` becomes the float again."""
    if isinstance(x, dict):
        if len(x) == 1 and _FLOAT in x:
            return float(x[_FLOAT])
        return {k: restore_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [restore_floats(v) for v in x]
    return x


def pct(x: Any, digits: int = 1, *, trim: bool = False) -> str:
    """0.0123 -> "1.2%" ("-" for None); with `trim`, trailing zeros go: pct(0.02, 3, trim=True) -> "2.0%"."""
    if x is None:
        return "-"
    t = f"{100 * x:.{digits}f}"
    if trim and "." in t:
        t = t.rstrip("0")
        t = t + "0" if t.endswith(".") else t
    return t + "%"


def signed_pct(x: Any, digits: int = 1, *, trim: bool = False) -> str:
    """pct with a sign: +1.2%."""
    if x is None:
        return "-"
    return ("+" if x >= 0 else "") + pct(x, digits, trim=trim)
