"""Typed, strict loading of option tables into frozen dataclasses.

The configuration file, the applications created over the API and every plugin's options go
through ``build``: unknown keys are errors, values are checked against the field's type, and
every message names the full key (``apps[0].timeout``) so a user can find it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    None: 1,
}


class Duration(float):
    """Seconds; written as a number of seconds or a string such as ``"500ms"``, ``"5s"``, ``"2h"``."""


class ByteSize(int):
    """Bytes; written as a number or a string such as ``"512MiB"`` or ``"2GB"``."""


class Regex(str):
    """A regular expression, checked to compile."""


def parse_duration(value: object, where: str) -> Duration:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration such as '5s', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{where}: expected a duration such as '5s', '250ms' or '2h', got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: a duration cannot be negative, got {value!r}")
    return Duration(seconds)


def parse_size(value: object, where: str) -> ByteSize:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size such as '512MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(f"{where}: expected a size such as '512MiB' or '2GB', got {value!r}")
    if size < 0:
        raise ConfigError(f"{where}: a size cannot be negative, got {value!r}")
    return ByteSize(size)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: object, where: str) -> Any:
    """Convert and check one value against a type hint."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, where)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return tuple(convert(item_tp, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _key_tp, val_tp = get_args(tp) or (str, Any)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: keys must be strings, got {key!r}")
            out[key] = convert(val_tp, item, f"{where}.{key}")
        return types.MappingProxyType(out)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build(tp, value, where)
    if tp is Duration:
        return parse_duration(value, where)
    if tp is ByteSize:
        return parse_size(value, where)
    if tp is Regex:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a regular expression string, got {value!r}")
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{where}: invalid regular expression {value!r}: {exc}") from None
        return Regex(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported option type {tp!r}")  # pragma: no cover - a programming error


def build(cls: type[T], data: Mapping[str, object], where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown or missing keys are errors.

    A field's ``metadata["check"]``, if given, is called with the converted value and the key's
    name and may raise ``ConfigError`` for range checks.
    """
    if not dataclasses.is_dataclass(cls):  # pragma: no cover - a programming error
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            value = convert(hints[name], data[name], key)
            check = field.metadata.get("check")
            if check is not None:
                check(value, key)
            kwargs[name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


def positive(value: float | None, where: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{where}: must be greater than zero, got {value!r}")


def non_negative(value: float | None, where: str) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")


def to_plain(obj: object) -> Any:
    """The JSON-compatible form of a built options object (for the API and the database)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, ByteSize):
        return int(obj)
    if isinstance(obj, Duration):
        return float(obj)
    return obj
