"""Typed configs from YAML: nested dataclasses filled from a mapping, every key checked.

An unknown key, a wrong type or a missing required value raises ValueError naming the dotted key
("training.lr: expected float, got 'fast'"), so a typo never silently falls back to a default. A float field also
takes a string in float notation: YAML 1.1 reads 2e-5 (no dot) as the string "2e-5".
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def from_mapping(cls, raw, where: str = "", base=None):
    """An instance of dataclass `cls` from a (possibly partial) mapping; what is absent keeps its default: the
    field's default, or for a nested section its value in `base` / the default section (so a section whose
    default differs from its class's defaults keeps those values for the keys not given)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        section = _section_type(hints[name])
        if section is not None and isinstance(value, dict):
            default = getattr(base, name) if base is not None else _default(fields[name])
            values[name] = from_mapping(section, value, key, base=default if isinstance(default, section) else None)
        else:
            values[name] = _convert(hints[name], value, key)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as error:  # a required field without a value
        raise ValueError(f"{where or 'config'}: {error}") from None


def _section_type(hint):
    """The dataclass of a field typed `Section` or `Section | None`, else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[-1])
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args or (typing.Any, typing.Any)
        return {
            _convert(key_type, k, f"{where} key {k!r}"): _convert(value_type, v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else typing.Any
        return origin(_convert(item, v, f"{where}[{k}]") for k, v in enumerate(value))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT.fullmatch(value.strip()):
        return float(value)
    if hint is typing.Any or (isinstance(hint, type) and isinstance(value, hint) and not _bool_as_number(hint, value)):
        return value
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _bool_as_number(hint, value) -> bool:
    return isinstance(value, bool) and hint is not bool


def load_config(cls, path, overrides: list[str] = ()):
    """Dataclass `cls` from a YAML (or JSON) file, then `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--config: no such file {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {override!r}: expected key.sub=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {override!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    try:
        return from_mapping(cls, raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def to_mapping(config) -> dict:
    """The config as plain data (tuples as lists), e.g. to save the resolved config next to a run's outputs."""
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
