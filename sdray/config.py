"""Typed configuration: YAML + dotted overrides -> frozen dataclasses, validated on creation.

Every stage owns a ``@dataclass(kw_only=True, frozen=True)`` config next to its code. This module only holds
the generic machinery: reading YAML, applying ``--set section.key=value`` overrides, and converting nested
dicts into dataclasses with type checks. Unknown or mistyped keys raise :class:`ConfigError` naming the key
and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from sdray.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping top level is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied; values are parsed as YAML scalars."""
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.learning_rate=2e-4), got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str) -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types.

    Args:
        cls: a dataclass type whose fields carry type hints.
        data: the mapping read from YAML (``None`` means all defaults).
        where: the dotted key of ``data`` for messages (``""`` at the top level).
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {_join(where, unknown[0])!r} (known: {', '.join(sorted(fields))})")
    hints = get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-YAML-safe dict of a (nested) config dataclass; tuples become lists."""
    return _plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, saved beside every output."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:  # noqa: PLR0911 - one branch per supported type
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        value = _yaml_bool_as_choice(value, get_args(tp))
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    return _convert_scalar(tp, value, where)


# YAML 1.1 reads an unquoted no/off/yes/on as a boolean; where a string choice is spelled that way, it is meant.
_BOOL_SPELLINGS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _yaml_bool_as_choice(value: Any, choices: tuple) -> Any:
    if not isinstance(value, bool):
        return value
    spelled = [c for c in choices if isinstance(c, str) and c.lower() in _BOOL_SPELLINGS[value]]
    return spelled[0] if len(spelled) == 1 else value


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    # bool is a subclass of int: refuse `true` for an int field and 1 for a bool field.
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
