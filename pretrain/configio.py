"""Typed dataclass configs from YAML and ``key.sub=value`` overrides, strict about keys and types.

Generic machinery only: which sections exist is ``config.py``'s business. Errors name the dotted key
and, for a misspelt key, the closest valid one, so a typo fails before any process starts work.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be run: unknown key, wrong type or inconsistent values."""


def closest_key_hint(key: str, valid: list[str]) -> str:
    """The end of an unknown-key error: the closest valid key, else all of them."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(valid))}."


def _is_optional(tp: Any) -> tuple[bool, list[Any]]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = list(typing.get_args(tp))
        return type(None) in args, [a for a in args if a is not type(None)]
    return False, [tp]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts lists/dicts into dataclasses."""
    if tp is Any:
        return value
    optional, alternatives = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)}).")
    errors = []
    for alt in alternatives:
        try:
            return _coerce_one(value, alt, where)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}.")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_one(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}.")
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}.")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}.")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"Unknown config key '{path}'.{closest_key_hint(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default was not given
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain YAML-able structure of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` → (["optim", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.sub=value.")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override '{text}' has an empty key part.")
    # YAML reads "1e-3" as a string; numbers written that way are meant as floats.
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value[0] in "0123456789-+." \
                else value
        except ValueError:
            pass
    return key.split("."), value


def apply_override(tree: dict, keys: list[str], value: Any, schema: type) -> None:
    """Sets ``tree[k1][k2]... = value``, checking each key against the dataclass ``schema``."""
    node, cls, walked = tree, schema, []
    for depth, key in enumerate(keys):
        walked.append(key)
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"'{'.'.join(walked)}': index out of range (list has {len(node)}).")
            idx = int(key)
            if last:
                node[idx] = value
                return
            node, cls = node[idx], _item_dataclass(cls)
            continue
        if cls is not None and dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            if key not in names:
                raise ConfigError(f"Unknown config key '{'.'.join(walked)}'.{closest_key_hint(key, names)}")
            field_type = typing.get_type_hints(cls)[key]
        else:
            field_type = None
        if last:
            node[key] = value
            return
        if node.get(key) is None:
            node[key] = {}
        node, cls = node[key], _unwrap_dataclass(field_type)


def _unwrap_dataclass(tp: Any) -> Any:
    if tp is None:
        return None
    _, alternatives = _is_optional(tp)
    for alt in alternatives:
        if dataclasses.is_dataclass(alt) or typing.get_origin(alt) in (list, tuple):
            return alt
    return None


def _item_dataclass(tp: Any) -> Any:
    args = typing.get_args(tp) if tp is not None else ()
    return args[0] if args else None


def read_yaml_tree(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A YAML mapping; a top-level ``base: other.yaml`` is read first and this file merged over it
    (mappings merge key by key, anything else is replaced)."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}' does not exist.")
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping at the top level.")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if os.path.abspath(base) in _seen + (os.path.abspath(path),):
        raise ConfigError(f"Config file '{path}': base '{base}' includes itself.")
    return merge_trees(read_yaml_tree(base, _seen + (os.path.abspath(path),)), tree)


def merge_trees(base: dict, over: dict) -> dict:
    """``over`` merged onto ``base``: mappings merge key by key, anything else is replaced (a list
    too). Neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_trees(out[key], value) if both else copy.deepcopy(value)
    return out
