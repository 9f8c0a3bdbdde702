"""Command-line options generated from the settings' declaration (:mod:`flipcheck.evaluation.options`).

``@settings_options(EvalOptions)`` gives a command one typer option per field of the model (its type,
default and description as help) and calls the command with ``options=`` the validated model instead, so
a setting is declared once and every command that takes it offers it the same way. A bad value is one
line, exit 2, before the command's body runs.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.options import build


def cli_fields(model: type[BaseModel], exclude: typing.Iterable[str] = ()) -> dict[str, FieldInfo]:
    """The fields of `model` that are command-line options (not marked ``cli: False``), minus `exclude`."""
    skip = set(exclude)
    return {name: f for name, f in model.model_fields.items()
            if name not in skip and (f.json_schema_extra or {}).get("cli", True)}


def flag(name: str, field: FieldInfo) -> str:
    return (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")


def _parts(annotation) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def cli_type(annotation) -> Any:
    """What typer parses a field as: its own type where click has one (bool, int, float, str, a list of
    str); text where the field mixes kinds (``int | "auto"``, a choice) and the model reads it."""
    parts = [p for p in _parts(annotation) if p is not type(None)]
    optional = len(parts) < len(_parts(annotation))
    if any(typing.get_origin(p) is list for p in parts):
        return list[str] | None
    if parts == [bool]:
        return bool
    if len(parts) == 1 and parts[0] in (int, float, str):
        return parts[0] | None if optional else parts[0]
    if set(parts) == {int, float}:
        return float | None if optional else float
    return str | None if optional or any(typing.get_origin(p) is Literal for p in parts) else str


def _param(name: str, field: FieldInfo, *, overrides: bool) -> inspect.Parameter:
    typ = cli_type(field.annotation)
    default = field.get_default(call_default_factory=True)
    if typ is bool:
        default = bool(default) and not overrides
    elif overrides or default in (None, []):
        default = None
        typ = typ if type(None) in typing.get_args(typ) else typ | None
    elif typ in (str, str | None):
        default = str(default)  # --batch-size 16: text that the model reads
    info = typer.Option(flag(name, field), help=field.description or "")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[typ, info])


def option(model: type[BaseModel], name: str):
    """The typer type of one field, for a command that takes it alone (``compress --device``)."""
    return _param(name, model.model_fields[name], overrides=False).annotation


def settings_options(model: type[BaseModel], *, on_error, exclude: typing.Iterable[str] = (), overrides: bool = False,
                     what: str = "options"):
    """Decorate a typer command: it gains one option per field of `model` (but `exclude`), placed before
    ``--verbose``, and receives ``options``: a `model` instance (with `overrides`: a dict of only the
    options given, their defaults None, for a command that changes what a file already holds). A bad
    value goes to ``on_error(error, verbose)`` (the command's one-line exit)."""
    fields = cli_fields(model, exclude)

    def decorate(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(fn).parameters.values() if p.name != "options"]
        head = [p for p in own if p.name != "verbose"]
        clash = set(fields) & {p.name for p in head}
        if clash:
            raise TypeError(f"{fn.__name__} declares {sorted(clash)} itself; they come from {model.__name__}")
        params = head + [_param(n, f, overrides=overrides) for n, f in fields.items()] + [p for p in own if p.name == "verbose"]

        @functools.wraps(fn)
        def command(**kwargs):
            values = {n: kwargs.pop(n) for n in fields}
            if overrides:  # only what was given: the command merges it into what it holds and checks the whole
                options: Any = {k: v for k, v in values.items() if v is not None and v is not False and v != []}
            else:
                try:
                    options = build(model, what, **values)
                except FlipcheckError as err:
                    on_error(err, bool(kwargs.get("verbose")))
            return fn(options=options, **kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
