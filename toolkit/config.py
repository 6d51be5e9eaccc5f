"""Typed configs at the edge: nested dataclasses filled from YAML, then `--set section.key=value`
overrides. Unknown keys and values of the wrong type fail here, naming the key and the file; code
inside the package receives validated dataclasses and never looks a key up with a default."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "~", "")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the source and the key."""


def coerce(key: str, value: Any, kind: Any, source: str = "config") -> Any:
    """`value` (from YAML, or a --set string) as type `kind`, or a ConfigError naming `key`."""
    def fail(why: str):
        raise ConfigError(f"{source}: {key}={value!r} {why}")

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        rest = tuple(a for a in args if a is not type(None))
        kind = rest[0] if len(rest) == 1 else typing.Union[rest]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        for option in args:  # e.g. bool | str: try the narrow type first
            try:
                return coerce(key, value, option, source)
            except ConfigError:
                continue
        fail("is not a valid value")
    if origin is typing.Literal:
        if value in args:
            return value
        fail(f"must be one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            fail("must be a list")
        inner = args[0] if args else str
        converted = [coerce(key, v, inner, source) for v in items]
        return tuple(converted) if origin is tuple else converted
    if kind is dict or origin is dict:  # passed through; its consumer validates the keys
        if not isinstance(value, dict):
            fail("must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            fail("must be a mapping")
        return from_dict(kind, value, source, prefix=f"{key}.")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail("must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            fail("must be an integer")
        try:
            return int(value)
        except ValueError:
            fail("must be an integer")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail("must be a number")
        try:
            return float(value)
        except ValueError:
            fail("must be a number")
    if kind is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            fail("must be a string")
        return str(value)
    raise TypeError(f"unhandled config type {kind!r} for {key}")


def from_dict(cls: type[T], values: dict, source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; keys not given keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' "
                          f"(known in {prefix or 'the top level'}: {', '.join(sorted(fields))})")
    kwargs = {name: coerce(prefix + name, value, hints[name], source) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a dataclass's own __post_init__ checks
        raise ConfigError(f"{source}: {err}") from None


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {getattr(err, 'problem', None) or err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return loaded


def apply_overrides(values: dict, overrides: typing.Iterable[str]) -> dict:
    """`section.key=value` strings merged into a nested mapping (a copy). Values stay strings until
    `coerce` converts them to the field's type; YAML-style lists are accepted as `a,b,c`."""
    merged = _deep_copy(values)
    for pair in overrides or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        node = merged
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         base: dict | None = None) -> T:
    """`base` values, then the YAML file, then the overrides: the dataclass `cls`, validated."""
    values = deep_merge(base or {}, read_yaml(path) if path else {})
    source = str(path) if path else "config"
    return from_dict(cls, apply_overrides(values, overrides), source)


def to_dict(obj) -> dict:
    """A dataclass config as plain YAML/JSON-ready data (tuples become lists)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(obj)


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def deep_merge(a: dict, b: dict) -> dict:
    """`a` overlaid with `b`, nested dicts merged key by key."""
    out = _deep_copy(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
