"""YAML -> :class:`TrainConfig`: typed conversion with the key in every error, ``section.key=value``
overrides, and the rule for relative paths.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ...errors import ConfigError
from .schema import TrainConfig, bad_value
from .validate import validate

# ---------------------------------------------------------------------------
# dict -> dataclass, with the key in every error


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad_value(key, value, "must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad_value(key, value, "expected a mapping of keys")
        return _build(tp, value, key)
    if value is None:
        raise bad_value(key, value, "must not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad_value(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad_value(key, value, "expected an integer")
        if isinstance(value, int):
            return value
        # YAML 1.1 reads 5.7e12 as a string and 1e3 as a string; accept integral numbers.
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad_value(key, value, "expected an integer") from None
        if not math.isfinite(f) or f != int(f):
            raise bad_value(key, value, "expected an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise bad_value(key, value, "expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise bad_value(key, value, "expected a number") from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad_value(key, value, "expected a string")
    if origin is tuple:
        if isinstance(value, (str, int, float)) and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad_value(key, value, "expected a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad_value(key, value, "expected a mapping")
        return dict(value)
    raise TypeError(f"{key}: unsupported field type {tp}")  # a bug in this file


def _build(cls, d: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in d:
            kwargs[name] = _convert(hints[name], d[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


# ---------------------------------------------------------------------------
# loading


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (values parsed as YAML) applied to a raw config dict."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: expected section.key=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{item}: expected section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:i + 1])}: is not a section, cannot set {path}")
            node[k] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return raw


def from_dict(raw: dict) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, found {type(raw).__name__}")
    cfg = _build(TrainConfig, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from nothing when ``path`` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = resolve_paths(raw, path.parent)
    return from_dict(apply_overrides(raw, list(overrides)))


# (section, key) of the keys that hold paths. The second set may also hold a hub repo id or a
# keyword ("bytes"): their values are paths when they start with "." or name an existing path.
_PATH_KEYS = (("", "run_dir"), ("data", "train"), ("model", "config_json"))
_PATH_OR_NAME_KEYS = (("data", "tokenizer"), ("model", "init_from"), ("lora", "init_from"))


def resolve_paths(raw: dict, base: str | Path) -> dict:
    """The one rule for relative paths: a path is relative to where it is written. Paths in a
    config file are joined to that file's folder here; ``section.key=value`` overrides keep
    theirs, relative to the current directory, as the shell reads them. Absolute paths and
    ``~`` are left as they are.

    Example: ``configs/tiny-cpu.yaml`` says ``data.train: [../data/shakespeare.txt.gz]`` and
    ``run_dir: ../runs/tiny-cpu``, so it runs the same from any directory.
    """
    base = Path(base)

    def join(value, must_exist=False):
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        joined = os.path.normpath(base / value)  # configs/../runs/x -> runs/x
        if must_exist and not value.startswith(".") and not os.path.exists(joined):
            return value
        return joined

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for keys, must_exist in ((_PATH_KEYS, False), (_PATH_OR_NAME_KEYS, True)):
        for section, key in keys:
            node = raw if not section else raw.get(section)
            if not isinstance(node, dict) or key not in node:
                continue
            value = node[key]
            if isinstance(value, list):
                node[key] = [join(v, must_exist) for v in value]
            else:
                node[key] = join(value, must_exist)
    return raw
