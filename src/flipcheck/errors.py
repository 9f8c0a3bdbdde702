"""Errors a user can act on. The CLI prints their message on one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlipcheckError(ValueError):
    """A problem with the user's input or environment, phrased so they can fix it."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for close matches of `name` in `choices`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def format_validation_error(what: str, err) -> str:
    """A pydantic ValidationError as one line: "wanda: sparsity: Input should be ... (got 2.0)"."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(settings)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown setting {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"{what}: " + "; ".join(parts)
