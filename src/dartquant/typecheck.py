"""Settings are typed: one generic check, driven by the dataclass annotations.

Every settings dataclass (RunConfig and its sections) calls `check_types(self)` in
`__post_init__`, so recipes, flags and Python callers all pass through it: a boolean only as a
boolean (`r3: "false"` is refused, not read as true), an int never as a float, string or bool,
a float also from an int (normalized to float), `X | None`, `list[X]`, `dict[K, V]`. The
message names the key, the value and what is allowed. Ranges and choices are each section's
`validate()`.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing


def check_types(obj) -> None:
    """Check (and normalize int -> float for float fields) every field of dataclass `obj`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or f.name == "options":
            continue  # nested sections check themselves
        setattr(obj, f.name, check_type(f.name, value, f.type, type(obj)))


def check_type(key: str, value, annotation, owner: type):
    """`value` if it is of the declared type (ints accepted, as floats, for floats), else a ValueError
    naming the key, the value and what is allowed."""
    hint = resolve(annotation, owner)
    if _matches(value, hint):
        return _normalize(value, hint)
    raise ValueError(f"setting {key}: {value!r} ({type(value).__name__}) is not valid; expected {_describe(hint)}")


def resolve(annotation, owner: type):
    """A (possibly postponed, string) annotation of `owner`'s field as a type."""
    if isinstance(annotation, str):
        module = sys.modules[owner.__module__]
        return eval(annotation, {**vars(typing), **vars(module)})  # our own dataclasses' annotations only
    return annotation


def _union_args(hint):
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _matches(value, hint) -> bool:
    args = _union_args(hint)
    if args is not None:
        return any(_matches(value, h) for h in args)
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(hint) or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(_matches(k, kt) and _matches(v, vt) for k, v in value.items())
    if hint is typing.Any:
        return True
    return isinstance(hint, type) and isinstance(value, hint)


def _normalize(value, hint):
    if isinstance(value, bool) or value is None:
        return value
    args = _union_args(hint)
    if args is not None:
        return _normalize(value, next(h for h in args if _matches(value, h)))
    if hint is float:
        return float(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [_normalize(v, item) for v in value]
    return value


_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _describe(hint) -> str:
    args = _union_args(hint)
    if args is not None:
        return " or ".join(_describe(h) for h in args)
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin is list:
        item = typing.get_args(hint)[0]
        return f"a list of {_PLURAL.get(item, _describe(item))}"
    if origin is dict:
        kt, vt = typing.get_args(hint)
        return f"a mapping of {_PLURAL.get(kt, kt)} to {_PLURAL.get(vt, vt)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
