"""Pydantic's validation errors worded for people: which key, what is wrong, what to write instead.

Shared by the job file (`jobfile`), per-record overrides (`io.requests`) and the generated tables of the
README (`schemas`). It imports pydantic and nothing else of the project's heavy parts.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fiddler_batch.spec import JobSpec

Key = tuple[str | int, ...]


def dotted(key: Key) -> str:
    """A key path as the user writes it: `generation.stop[1]`."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def unwrap_optional(annotation: Any) -> Any:
    """`X` for `X | None`, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def explain(error: Any, key: Key, model: type[BaseModel] = JobSpec, name: str | None = None) -> tuple[str, str]:
    """(message, fix) for one pydantic error at `key` of `model`; `name` is how the key is shown to the user."""
    ctx = error.get("ctx") or {}
    name = name or dotted(key)
    if "fix" in ctx:
        return error["msg"], ctx["fix"]
    parent, field = _field_at(model, key)
    if error["type"] == "extra_forbidden":
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(key[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {key[-1]!r}", f"{hint}remove it or rename it; keys here: {', '.join(known)}"
    expected = expected_value(field) if field else "a valid value"
    about = f" ({_first_sentence(field.description)})" if field and field.description else ""
    if error["type"] == "missing":
        return "required key missing", f"add {name}: {expected}{about}"
    return f"{error['msg']} (got {error['input']!r})", f"set {name} to {expected}{about}"


def _field_at(model: type[BaseModel], key: Key) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model that holds the last part of `key`, and that part's field (None where the key is unknown)."""
    current: Any = model
    field = None
    parent = None
    for part in key:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return parent, field
        parent = current
        field = current.model_fields.get(part)
        if field is None:
            return parent, None
        current = unwrap_optional(field.annotation)
    return parent, field


def expected_value(field: FieldInfo) -> str:
    section = unwrap_optional(field.annotation)
    if isinstance(section, type) and issubclass(section, BaseModel):
        required = [name for name, sub in section.model_fields.items() if sub.is_required()]
        keys = ", ".join(required) if required else ", ".join(section.model_fields)
        return f"a section with keys ({'required: ' if required else ''}{keys})"
    words = type_words(field.annotation)
    bounds = []
    for item in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{symbol} {getattr(item, attr)}")
    return words + (" " + " and ".join(bounds) if bounds else "")


def type_words(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        constraints = [getattr(item, "pattern", None) for item in annotation.__metadata__]
        return "a URL" if any(c and "://" in c for c in constraints) else type_words(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return " or ".join(type_words(arg) for arg in args) + (" or null" if optional else "")
    if origin is list:
        item = typing.get_args(annotation)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return f"a list of objects ({', '.join(item.model_fields)})"
        return "a list of " + type_words(item).removeprefix("a ") + "s"
    if origin is dict or annotation is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of keys"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        annotation, "a valid value"
    )


def _first_sentence(text: str) -> str:
    sentence = " ".join(text.split()).split(". ")[0]
    return sentence.rstrip(".")
