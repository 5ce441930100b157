"""The config machinery: documented fields, validation in one place, YAML + dotted overrides.

Every config is a dataclass deriving from :class:`Section`. A field is declared with :func:`doc`
(default + docstring, shown by ``oars-fast <cmd> --help``); a field with a fixed set of values is
annotated ``Literal[...]`` and checked by :func:`check_choices` (the one place choices are
validated: at construction, whether from YAML, overrides or code). Other constraints live in the
section's ``check()``, using :func:`check_range`, :func:`check_pair` and :func:`check_probs`. Every
error is a :class:`ConfigError` naming the field, the bad value and the valid values.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the valid values."""


# Keys that moved; an old key gets an error naming its new place.
RENAMED: dict[str, str] = {
    **{f"degradation.{old}": f"degradation.first.{new}" for old, new in (
        ("sinc_prob", "sinc_prob"), ("blur_sigma", "blur_sigma"), ("betag_range", "betag_range"),
        ("betap_range", "betap_range"), ("resize_prob", "resize_prob"), ("resize_range", "resize_range"),
        ("gaussian_noise_prob", "gaussian_noise_prob"), ("noise_range", "noise_range"),
        ("poisson_scale_range", "poisson_scale_range"), ("gray_noise_prob", "gray_noise_prob"),
        ("jpeg_range", "jpeg_range"))},
    **{f"degradation.{old}2": f"degradation.second.{old}" for old in (
        "sinc_prob", "blur_sigma", "betag_range", "betap_range", "resize_prob", "resize_range", "gaussian_noise_prob",
        "noise_range", "poisson_scale_range", "gray_noise_prob", "jpeg_range")},
    "degradation.second_blur_prob": "degradation.second.blur_prob",
    "lora.fused": "lora.kernel (triton | addmm | peft)",
}


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a docstring (``metadata['doc']``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def section(factory: Any, text: str = "") -> Any:
    """A nested section field (its default built by `factory`)."""
    return field(default_factory=factory, metadata={"doc": text})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _name(obj: Any, name: str) -> str:
    return f"{type(obj).__name__}.{name}"


class Section:
    """Base of every config dataclass: choices checked from the annotations, then ``check()``."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.check()

    def check(self) -> None:
        """Constraints beyond the choices (ranges, pairs, cross-field rules)."""


def check_choices(obj: Any) -> None:
    """Every ``Literal[...]`` field (or list of them) of `obj` holds one of its values."""
    for f in dataclasses.fields(obj):
        tp, optional = _strip_optional(_hints(type(obj))[f.name])
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        if typing.get_origin(tp) is Literal:
            valid = list(typing.get_args(tp))
            if value not in valid:
                raise ConfigError(f"{_name(obj, f.name)}={value!r} is not valid; choose one of {valid}")
        elif typing.get_origin(tp) is list and typing.get_args(tp) and \
                typing.get_origin(typing.get_args(tp)[0]) is Literal:
            valid = list(typing.get_args(typing.get_args(tp)[0]))
            for v in value:
                if v not in valid:
                    raise ConfigError(f"{_name(obj, f.name)} has {v!r}; valid values: {valid}")


def check_range(obj: Any, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    value = getattr(obj, name)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        lo_s, hi_s = ("-inf" if lo is None else f"{lo}"), ("inf" if hi is None else f"{hi}")
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{_name(obj, name)}={value!r} is out of range; valid: {bracket}{lo_s}, {hi_s}]")


def check_pair(obj: Any, name: str, lo: float | None = None, hi: float | None = None) -> None:
    value = getattr(obj, name)
    if len(value) != 2 or value[0] > value[1]:
        raise ConfigError(f"{_name(obj, name)}={value!r} must be a [low, high] pair with low <= high")
    if any((lo is not None and v < lo) or (hi is not None and v > hi) for v in value):
        raise ConfigError(f"{_name(obj, name)}={value!r}: values must lie in [{lo}, {hi}]")


def check_probs(obj: Any, name: str, n: int) -> None:
    value = getattr(obj, name)
    if len(value) != n or any(p < 0 for p in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ConfigError(f"{_name(obj, name)}={value!r} must be {n} non-negative probabilities summing to 1")


def per_rank(global_size: int, world_size: int, grad_accum: int = 1, name: str = "batch_size") -> int:
    """Per-rank micro-batch from a global batch: ``global = micro * grad_accum * world_size``."""
    denom = world_size * grad_accum
    if global_size % denom != 0:
        raise ConfigError(f"{name}={global_size} (global) is not divisible by world_size*grad_accum={world_size}*"
                          f"{grad_accum}={denom}; choose a multiple of {denom}")
    return global_size // denom


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    origin = typing.get_origin(tp)
    try:
        if origin is Literal:
            valid = typing.get_args(tp)
            if all(isinstance(v, str) for v in valid):
                if isinstance(value, bool) and {"on", "off"} <= set(valid):  # YAML reads a bare on/off as a bool
                    return "on" if value else "off"
                return _coerce(value, str, where)
            if all(isinstance(v, int) for v in valid):
                return _coerce(value, int, where)
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            (inner,) = typing.get_args(tp) or (Any,)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _default_of(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def from_dict(cls: type, data: dict | None, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a nested dict, over `base` (an instance giving the defaults; else the
    class's own), rejecting unknown keys (listing the valid ones, or naming a renamed key's new place)."""
    data = dict(data or {})
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    for key in sorted(set(data) - set(names)):
        if prefix + key in RENAMED:
            raise ConfigError(f"config key {prefix + key} has moved: use {RENAMED[prefix + key]}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; valid keys under "
                          f"{where or 'the top level'}: {names}")
    kwargs = {}
    for name in names:
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            if name not in data:
                continue
            if not isinstance(data[name], dict):
                raise ConfigError(f"{key} must be a mapping, got {data[name]!r}")
            sub_base = getattr(base, name) if base is not None else _default_of(cls, name)
            kwargs[name] = from_dict(tp, data[name], key, sub_base)
        elif name in data:
            kwargs[name] = _coerce(data[name], tp, key)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def shipped_config(name: str | Path) -> Path:
    """A config that ships with the package, e.g. ``demo/sft.yaml`` (``configs/`` in the source tree,
    ``oars_fast.configs`` when installed)."""
    return Path(str(importlib.resources.files("oars_fast.configs"))) / name


def resolve_config_path(path: str | Path) -> Path:
    """`path` as given, or, when no such file exists, the shipped config of that name (``configs/demo/x.yaml``
    or ``demo/x.yaml`` name ``oars_fast.configs/demo/x.yaml``): an installed package runs from any folder."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    shipped = shipped_config(Path(*parts)) if parts else path
    return shipped if shipped.is_file() else path


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                world: int = 1) -> Any:
    """Job dataclass `cls` from a YAML file (optional; see :func:`resolve_config_path`) plus dotted
    overrides. `world`: the number of processes the job will run on (the launcher's), against which batch
    splits are checked."""
    data: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = apply_overrides(data, overrides)
    try:
        job = from_dict(cls, data)
        check_world = getattr(job, "check_world", None)
        if check_world is not None:
            check_world(world)
        return job
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(obj: Any, prefix: str = "") -> list[str]:
    """One line per leaf field of a config class or instance: dotted name, default and docstring."""
    obj = obj() if isinstance(obj, type) else obj
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe(value, f"{name}."))
        else:
            lines.append(f"  {name} = {value!r}\n      {f.metadata.get('doc', '')}")
    return lines
