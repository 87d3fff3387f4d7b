"""CLI options derived from the settings objects that declare them (``config.setting``): a command
names a settings class as a parameter and gets one option per field, with the field's help text, and
receives the built (validated) object. Options that belong to no settings object are declared here once."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import typer

from ..config import help_of


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """(the type typer parses, whether the value is JSON text) for a settings field's type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner, is_json = _cli_type(args[0]) if len(args) == 1 else (str, False)
        return (inner | None if type(None) in get_args(tp) else inner), is_json
    if origin is Literal:
        return str, False  # the settings object checks the value and names the choices
    if tp is dict or origin is dict:
        return str, True
    return tp, False


def _is_bool(tp: Any) -> bool:
    return tp is bool or set(get_args(tp)) == {bool, type(None)}


PANELS = {
    "LoadSettings": "Model",
    "FlashBackConfig": "Retrieval during generation",
    "Sampling": "Sampling",
    "StoreLocation": "Chroma store",
    "TrainConfig": "Training",
    "ExampleSettings": "Examples",
    "ExampleSource": "Example source",
}
"""The help panel of each settings class's options: at 80 columns, each panel sizes its own columns."""


def settings_options(cls: type, skip: tuple[str, ...] = (), **defaults: Any) -> list[tuple[inspect.Parameter, bool]]:
    """One typer option per field of the dataclass ``cls`` (less ``skip``), with per-command ``defaults``."""
    hints = get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, is_json = _cli_type(hints[f.name])
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = None  # a factory default (a dict): unset on the command line
        flag = "--" + f.name.replace("_", "-")
        # a pair only where both are needed (a default of True, or None = automatic), in a panel of its own: a
        # panel sizes its columns for itself, so the others keep three columns and stay readable at 80
        pair = _is_bool(tp) and default is not False
        decl = f"{flag}/--no-{flag[2:]}" if pair else flag
        panel = PANELS.get(cls.__name__, cls.__name__) + (": switches" if pair else "")
        option = typer.Option(decl, help=help_of(f), rich_help_panel=panel)
        param = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default)
        params.append((param.replace(annotation=Annotated[tp, option]), is_json))
    return params


def with_settings(**groups: type | tuple[type, dict[str, Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace each parameter named in ``groups`` by the options of its settings class; the command is
    called with the object built from them. ``groups`` values: a class, or (class, {"skip": (...),
    field: default})."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = get_type_hints(fn, include_extras=True)
        params: list[inspect.Parameter] = []
        built: dict[str, tuple[type, list[str], set[str]]] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.name not in groups:
                params.append(p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            spec = groups[p.name]
            cls, opts = spec if isinstance(spec, tuple) else (spec, {})
            derived = settings_options(cls, **opts)
            taken = {q.name for q in params} & {q.name for q, _ in derived}
            if taken:
                raise TypeError(f"{fn.__name__}: options {sorted(taken)} declared twice")
            params += [q for q, _ in derived]
            built[p.name] = (cls, [q.name for q, _ in derived], {q.name for q, j in derived if j})

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for name, (cls, names, json_fields) in built.items():
                values = {n: kwargs.pop(n) for n in names}
                for n in json_fields:
                    values[n] = _json_object(n, values[n])
                kwargs[name] = cls(**{k: v for k, v in values.items() if v is not None or k not in json_fields})
            return fn(**kwargs)

        # required arguments first, as Python signatures need
        params.sort(key=lambda q: q.default is not inspect.Parameter.empty)
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {q.name: q.annotation for q in params}
        return command

    return decorate


def _json_object(name: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    flag = "--" + name.replace("_", "-")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{flag} is not JSON ({exc.msg}); give an object.") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{flag} must be a JSON object.")
    return value


# Options that belong to no settings object, each declared once.
Out = Annotated[Path, typer.Option(help="Output folder.")]
Stem = Annotated[str, typer.Option(help="Output file name stem.")]
Model = Annotated[str, typer.Option(help="Base model: 'default', a hub id or a local path.")]
Tokenizer = Annotated[str, typer.Option(help="Reader model whose tokenizer sizes chunks.")]
ChunkTokens = Annotated[int, typer.Option(help="Chunk size in reader tokens.")]
MaxNewTokens = Annotated[int, typer.Option(help="Tokens to generate.")]
Seed = Annotated[int, typer.Option(help="Seed for sampling targets and windows.")]
Device = Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda when available).")]
MaxExamples = Annotated[
    int | None,
    typer.Option(help="Sample at most N targets (when building from --docs), or a seeded subset of --examples."),
]
