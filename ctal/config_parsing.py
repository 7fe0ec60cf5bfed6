"""Reading configs: YAML files and dotted ``key=value`` overrides into a checked dataclass.

The machinery ``ctal.config.load_config`` runs, apart from the schema it reads into: every value
checked against its field's type (``from_dict``), every range against its rule (``check_ranges``), a
YAML or override mistake turned into one ``ConfigError`` line naming the key or the position.
Torch-free, like ``ctal.config``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, NewType, Union

import yaml

from .variants import FUSION_VARIANTS  # torch-free: checking a config never imports the model

# A name in the fusion-variant table (ctal.variants.FUSION_VARIANTS), checked against it.
Fusion = NewType("Fusion", str)


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


# --------------------------------------------------------------------------------------------------
# value ranges the types cannot express: checked once, before Ray starts (ConfigError naming the key)

AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")


def check_ranges(cfg: Any, rules: dict[str, tuple], prefix: str = "") -> None:
    """Raise ConfigError for the first field of ``cfg`` outside its rule: {key: (test, allowed)}. The
    one range check: dataclasses run it in ``__post_init__`` (checked where a config is built, before
    Ray starts, not inside a worker), the runs' checks (``validate_*``) on the config they are given."""
    for key, (ok, allowed) in rules.items():
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{prefix}{key}={value!r} is out of range: must be {allowed}")


# --------------------------------------------------------------------------------------------------
# values against their fields' types


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Fusion:
        tp, origin = Literal[tuple(FUSION_VARIANTS)], Literal
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
            value = str(value).lower()  # YAML reads `true` as a bool; "true" is a choice here
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list such as [6] or [0, 6, 12], got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r}; allowed keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = from_dict(tp, value, prefix + name + ".")
        else:
            kwargs[name] = _check_value(prefix + name, tp, value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.hidden_size=256", "lr=1e-4"]`` → nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {_yaml_problem(e, offset=len(key) + 1)}") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def _yaml_problem(e: yaml.YAMLError, offset: int = 0) -> str:
    """One line for a YAML error: what is wrong and where (1-based line and column)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1 + offset}: {what}"
    position = getattr(e, "position", None)  # a ReaderError: a character YAML does not allow
    return f"character {position + offset}: {what}" if position is not None else what


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; ConfigError naming the file and the position of a syntax error,
    or saying it is not UTF-8 text (a binary file given as a config)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "a config is YAML text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(e)}") from None
