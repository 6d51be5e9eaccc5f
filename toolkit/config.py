"""Typed configs at the edge: nested dataclasses filled from YAML, then `--set section.key=value`
overrides, then command-line flags generated from the same fields. Unknown keys and values of the
wrong type fail here, naming the key and the file; code inside the package receives validated
dataclasses and never looks a key up with a default.

A config dataclass declares each knob once, with `knob(default, "help text")`; its `__post_init__`
checks values with `require(...)`, and the loader adds the file and the section to the message. A
knob that moved is named in the class's MOVED_KEYS (old name -> new name in the section); one that
was removed, in REMOVED_KEYS (old name -> where its job went): either way the user is told.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "~", "")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the source and the key."""


class FieldError(ValueError):
    """A config dataclass's own check failed: the field, its value, and why. `from_dict` turns it
    into a ConfigError naming the file and the full key (e.g. `train.options.lr`)."""

    def __init__(self, name: str, value: Any, why: str):
        super().__init__(f"{name}={value!r} {why}")
        self.name, self.value, self.why = name, value, why


def require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise FieldError(name, value, why)


GIVEN = "given_keys"  # a config dataclass with this field learns which keys the user set


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
         internal: bool = False) -> Any:
    """A config field with its help text (shown by `--help` and the generated flags). `internal`
    fields are not read from YAML or flags."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={"help": help, "internal": internal},
                             **({"repr": False, "compare": False} if internal else {}))


def knob_of(cls, name: str) -> Any:
    """A field that is `cls`'s knob `name` again (its default and help): one declaration serving
    two configs (a pipeline section that passes the value on to `cls`)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return knob(f.default, f.metadata["help"], factory=f.default_factory)


def given_keys() -> Any:
    """The field that records which keys of a section were set by the user (YAML, --set, flags)."""
    return knob(factory=frozenset, internal=True)


def config_fields(cls) -> list[dataclasses.Field]:
    """The fields a user can set (not the internal ones)."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]


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
    fields = {f.name for f in config_fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        if moved := getattr(cls, "MOVED_KEYS", {}).get(unknown[0]):
            raise ConfigError(f"{source}: key '{prefix}{unknown[0]}' has moved: use '{prefix}{moved}'")
        if why := getattr(cls, "REMOVED_KEYS", {}).get(unknown[0]):
            raise ConfigError(f"{source}: key '{prefix}{unknown[0]}' was removed: {why}")
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' "
                          f"(known in {prefix or 'the top level'}: {', '.join(sorted(fields))})")
    kwargs = {name: coerce(prefix + name, value, hints[name], source) for name, value in values.items()}
    if any(f.name == GIVEN for f in dataclasses.fields(cls)):
        kwargs[GIVEN] = frozenset(values)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as err:
        raise ConfigError(f"{source}: {prefix}{err.name}={err.value!r} {err.why}") from None
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


def to_dict(obj, given_only: bool = False) -> dict:
    """A dataclass config as plain YAML/JSON-ready data (tuples become lists). `given_only`: of a
    section that records its given keys, only those (what the user wrote, the rest being defaults)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            names = [f.name for f in config_fields(value)]
            if given_only and hasattr(value, GIVEN):
                names = [n for n in names if n in getattr(value, GIVEN)]
            return {name: plain(getattr(value, name)) for name in names}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(obj)


def with_values(obj: T, **changes) -> T:
    """A copy with `changes` applied and counted as given by the user (when the section records that)."""
    if hasattr(obj, GIVEN):
        changes[GIVEN] = getattr(obj, GIVEN) | frozenset(changes)
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- command-line flags from the fields


def add_arguments(parser, cls, *, exclude: typing.Iterable[str] = (), required: typing.Iterable[str] = (),
                  underscore_aliases: bool = False) -> None:
    """One flag per field of `cls` (`--micro-batch-size`; with `underscore_aliases` also DeepSpeed's
    spelling `--micro_batch_size`), its help text and default from the field. Flags not given stay
    absent from the namespace, so they override a config file only when used; values go through
    the same `coerce` as YAML."""
    hints = typing.get_type_hints(cls)
    skip, must = set(exclude), set(required)
    for f in config_fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        args = typing.get_args(kind)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "" if default in (None, "", (), []) else f" (default: {_plain_default(default)})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=(f.metadata.get("help") or "") + shown)
        if f.name in must:
            kw["required"] = True
        names = [f"--{f.name.replace('_', '-')}"]
        if underscore_aliases and "_" in f.name and kind is not bool:
            names.append(f"--{f.name}")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif bool in args:  # e.g. bool | str: the bare flag means true, or it takes a value
            kw.update(nargs="?", const="true", metavar="VALUE")
        elif typing.get_origin(kind) is typing.Literal:
            kw.update(choices=args, metavar="{" + ",".join(map(str, args)) + "}")
        else:
            kw["metavar"] = _METAVARS.get(kind, "VALUE")
        parser.add_argument(*names, **kw)


_METAVARS = {int: "N", float: "X", str: "TEXT", typing.Optional[int]: "N", typing.Optional[float]: "X",
             typing.Optional[str]: "TEXT"}


def _plain_default(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple, frozenset)) else str(value)


def given_arguments(args: argparse.Namespace, cls) -> dict:
    """The flags of `cls` that were given on the command line, as a mapping for `from_dict`."""
    return {f.name: getattr(args, f.name) for f in config_fields(cls) if hasattr(args, f.name)}


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
