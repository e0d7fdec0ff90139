"""Typed configuration machinery: YAML (``yaml.safe_load``) -> nested dataclasses and back.

The bottom layer (no torch, nothing of volattack but checks and the registry's suggestions);
:class:`volattack.config.RunConfig` and every section's config dataclass are built with it.

Rules:
- Unknown keys are rejected with the dotted path and a "did you mean" suggestion.
- Values are type-checked against the dataclass annotations (int, float, str, bool,
  ``Optional[...]``, ``list[...]``, ``tuple[...]``, ``dict``, nested dataclasses).
- ``--set a.b=c`` overrides are applied to the raw mapping before conversion; the
  value is parsed with ``yaml.safe_load`` (so ``1e-3``, ``[1, 2]``, ``true`` work).
- Nothing is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from volattack.checks import parse_number
from volattack.registry import suggest

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise ``ConfigError`` naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:  # Optional[X]: report X's own error
            return _convert(value, non_none[0], path)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for section '{tp.__name__}', got {value!r}.")
        return from_dict(tp, value, path)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}.")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}.")
        if args and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {value!r}.")
        return tuple(
            _convert(v, args[i] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)
        )
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # "1e-3" (YAML 1.1 reads it as a string) and "8/255"
            value = _parse_float_text(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}.")
        return value
    return value


def _parse_float_text(text: str, path: str) -> Any:
    """Parse ``"1e-3"`` or a fraction ``"8/255"`` (never evaluated); other text is returned as is."""
    t = text.strip()
    if "/" in t:
        try:
            return parse_number(t, path)
        except ValueError:
            return text
    try:
        return float(t)
    except ValueError:
        return text


def from_dict(cls: type[C], data: Mapping[str, Any] | None, path: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys.

    Args:
        cls: a dataclass type whose fields all have defaults or appear in ``data``.
        data: the raw mapping (e.g. from ``yaml.safe_load``).
        path: dotted prefix used in error messages.

    Raises:
        ConfigError: unknown key (with a suggestion), missing required key, or a value
            of the wrong type; the message names the dotted key and the bad value.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"Unknown config key '{where}'.{suggest(str(key), fields)} "
                f"Valid keys here: {', '.join(sorted(fields))}."
            )
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"Missing required config key '{where}'.")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        if isinstance(e, ConfigError):
            raise
        prefix = f"{path}: " if path else ""
        raise ConfigError(f"{prefix}{e}") from e


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML-safe) form of a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``"a.b.c=value"`` into (``["a", "b", "c"]``, parsed value).

    The value is parsed with ``yaml.safe_load``: numbers, lists, booleans and null work.
    """
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}.")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key=value with a dotted key, got {item!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides (dotted keys) to a raw mapping, in order; returns a new mapping."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: '{k}' is not a section.")
            node = nxt
        node[keys[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; clear errors for missing/invalid files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file not found: {str(p)!r}.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(p)!r} must hold a mapping, got {type(data).__name__}.")
    return data


def dump_yaml(obj: Any) -> str:
    """YAML text of a dataclass tree or mapping (stable key order)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
