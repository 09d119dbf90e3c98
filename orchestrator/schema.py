"""Machinery for typed config sections: fields with a meaning and an allowed range.

A section is a dataclass whose fields are declared with :func:`param`. :func:`build`
turns a plain dict (from YAML) into the dataclass, refusing unknown keys, wrong types
and out-of-range values with a :class:`ConfigError` that names the dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the key."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None,
          gt: float | None = None, le: float | None = None, lt: float | None = None,
          choices: tuple | None = None, factory: Any = None, key: str | None = None) -> Any:
    """Declare a config field with its one-line meaning and allowed range; ``key``: the name it
    has in YAML and overrides where that is not the field's (a Python keyword: ``from``)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "key": key}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _allowed(meta: dict) -> str:
    parts = []
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]}")
    return " and ".join(parts)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def check_range(value: Any, meta: dict, key: str) -> None:
    """Raise if ``value`` falls outside the range declared in ``meta``."""
    if value is None:
        return
    choices = meta.get("choices")
    items = value if isinstance(value, list) else [value]  # a list's choices hold per item
    bad = (choices and any(v not in choices for v in items)) or any(
        meta.get(k) is not None and isinstance(value, (int, float)) and not op(value, meta[k])
        for k, op in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b),
                      ("le", lambda a, b: a <= b), ("lt", lambda a, b: a < b)))
    if bad:
        raise ConfigError(f"{key}: got {value!r}, allowed: {_allowed(meta)}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating every field."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(prefix, key)}: unknown key; known keys here: {known}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            value = _coerce(data[name], hints[f.name], key)
            check_range(value, f.metadata, key)
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required; {f.metadata.get('help', '')}")
    return cls(**kwargs)


def _key(f: dataclasses.Field) -> str:
    """A field's name in YAML."""
    return f.metadata.get("key") or f.name


def plain(obj: Any) -> Any:
    """A config dataclass as nested dicts under the keys YAML uses (what :func:`build` reads)."""
    if dataclasses.is_dataclass(obj):
        return {_key(f): plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default, allowed range and meaning (for docs and --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, _key(f))
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        allowed = _allowed(f.metadata)
        lines.append(f"{key} = {default!r}" + (f" ({allowed})" if allowed else "")
                     + f": {f.metadata.get('help', '')}")
    return lines


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating the intermediate mappings."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value
