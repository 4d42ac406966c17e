"""Typed config fields: every value converted to its declared type, ranges checked, one clear message.

YAML 1.1 (PyYAML) reads ``5e-4`` and ``1e-3`` as strings and ``on`` as true; overrides arrive as YAML
scalars too. Config dataclasses call ``coerce_fields(self, "section")`` first in ``__post_init__``,
so a value is converted the same way whether it came from a file, an override or Python code, and
``require`` states each range with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from cpet.errors import CpetError

_HINTS: dict[type, dict[str, Any]] = {}


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(key: str, value, tp) -> CpetError:
    return CpetError(f"{key}={value!r}: expected {_describe(tp)}")


def coerce(value, tp, key: str):
    """``value`` as type ``tp`` (int, float, bool, str, tuple[X, ...], unions with None), or a CpetError
    naming ``key``, the value and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _fail(key, value, tp)
        options = [a for a in args if a is not type(None)]
        for a in options:  # an exact match first: 5 stays an int under int | float
            if a in (int, float, bool, str) and type(value) is a:
                return value
        for a in options:
            try:
                return coerce(value, a, key)
            except CpetError:
                continue
        raise _fail(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _fail(key, value, tp)
    if tp is int:
        if isinstance(value, bool):
            raise _fail(key, value, tp)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                value = float(value.strip()) if not value.strip().lstrip("+-").isdigit() else int(value.strip())
            except ValueError:
                raise _fail(key, value, tp) from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _fail(key, value, tp)
    if tp is float:
        if isinstance(value, bool):
            raise _fail(key, value, tp)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _fail(key, value, tp) from None
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise CpetError(f"{key}={value!r}: expected a finite number")
            return float(value)
        raise _fail(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, tp)
    if origin is tuple or tp is tuple:
        if isinstance(value, str):
            value = [value]  # targets=q means [q], never ('q',) spelled out letter by letter
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, tp)
        if args and args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    return value


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def coerce_fields(obj, section: str) -> None:
    """Convert every field of the frozen dataclass ``obj`` to its declared type, in place."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints.get(f.name)):
            continue
        value = getattr(obj, f.name)
        new = coerce(value, hints.get(f.name, Any), f"{section}.{f.name}" if section else f.name)
        if new is not value:
            object.__setattr__(obj, f.name, new)


def require(ok: bool, key: str, value, rule: str) -> None:
    """Raise ``key=value: must be <rule>`` unless ``ok``."""
    if not ok:
        raise CpetError(f"{key}={value!r}: must be {rule}")
