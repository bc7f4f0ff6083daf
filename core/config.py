"""Strict dataclass configs: build from dicts/YAML, reject unknown keys, apply `a.b=value` overrides.

Values are validated and converted by pydantic (v2, lax mode) against each field's annotation.

Every config in the project is a dataclass; this module is the one place that turns plain data into them,
so that a typo in a YAML file is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from core.atomic import write_text
from core.errors import ConfigError

T = TypeVar("T")


# Field values are converted by pydantic (lax mode: "3" -> 3, 3.0 -> 3, "yes" -> True, [..] -> tuple, a
# number where a string is expected -> its text); this module walks the dataclasses itself so that an unknown
# key is an error naming it and the keys allowed, at any depth.
_FIELD_CONFIG = ConfigDict(coerce_numbers_to_str=True, arbitrary_types_allowed=True)


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp, config=_FIELD_CONFIG)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass of a field typed `SomeConfig` or `SomeConfig | None`, else None."""
    if _is_dataclass_type(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 and _is_dataclass_type(args[0]):
        return args[0]
    return None


def _accepts_bool(tp: Any) -> bool:
    return tp is bool or tp is Any or any(_accepts_bool(a) for a in typing.get_args(tp))


def _field_value(tp: Any, value: Any, where: str) -> Any:
    """`value` converted to the annotated type `tp`, or a ConfigError naming `where`."""
    nested = _nested_dataclass(tp)
    if nested is not None and not (value is None or isinstance(value, nested)):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {nested.__name__}, got {value!r}")
        return from_dict(nested, value, where)
    if isinstance(value, bool) and not _accepts_bool(tp):  # pydantic's lax mode reads true as 1
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise ConfigError(f"{where}{inner}: {first['msg']} (got {value!r})") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys are an error that lists the allowed ones."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _field_value(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass: dicts, lists, scalars; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into dataclass `cls` (strict)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    """YAML text of a dataclass; written to `path` when given."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
    if path is not None:
        write_text(path, text)
    return text


def apply_overrides(obj: T, overrides: Sequence[str]) -> T:
    """Return a copy of `obj` with `dotted.key=value` overrides applied (values parsed as YAML scalars)."""
    data = to_dict(obj)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override {item!r}: no config section {part!r}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return from_dict(type(obj), data)
