"""Configs as data: YAML files -> frozen dataclasses, ``--set key.sub=value`` overrides, shipped configs.

One loader for every dv365 config (training runs, pipelines, experiments). Each caller passes its own error
class, so a bad key is reported as that component's error (``TrainConfigError``, ``PipelineError``, ...), and
every message names the file and the dotted key.

Example::

    d = read_yaml_mapping("run.yaml", TrainConfigError)
    d = apply_overrides(d, parse_overrides(["run.steps=100"], TrainConfigError), TrainConfigError)
    cfg = build_dataclass(TrainConfig, d, "run.yaml", TrainConfigError)
    cfg = load_dataclass(TrainConfig, "run.yaml", {"run.steps": 100}, TrainConfigError)   # the three at once
    path = resolve_config("synth-quick", "dv365.train", "configs", TrainConfigError)   # shipped, or a path
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

ErrorType = type[Exception]


def shipped_file(package: str, *parts: str) -> Path:
    """The path of a data file shipped inside ``package`` (``importlib.resources``; installed or editable)."""
    ref = resources.files(package).joinpath(*parts)
    return Path(str(ref))


def read_yaml_mapping(path: str | Path, error: ErrorType, what: str = "config") -> dict[str, Any]:
    """Reads a YAML file whose top level is a mapping (an empty file is ``{}``)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {e}") from e
    if not isinstance(d, Mapping):
        raise error(f"{p}: a {what} must be a mapping, got {type(d).__name__}")
    return dict(d)


def load_dataclass(
    tp: Any, path: str | Path, overrides: Mapping[str, Any] | None, error: ErrorType, what: str = "config"
) -> Any:
    """YAML file -> ``--set`` overrides applied -> strict dataclass (:func:`build_dataclass`)."""
    d = apply_overrides(read_yaml_mapping(path, error, what), overrides or {}, error)
    return build_dataclass(tp, d, str(path), error)


def resolve_config(name_or_path: str | Path, package: str, folder: str, error: ErrorType) -> Path:
    """An existing file path as given, else the config ``<name>.yaml`` shipped in ``package/folder``."""
    p = Path(name_or_path)
    if p.exists():
        return p
    parts = folder.split("/")
    shipped = shipped_file(package, *parts, f"{name_or_path}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(f.stem for f in shipped_file(package, *parts).glob("*.yaml"))
    raise error(f"config file not found: {p} (or name a shipped config: {', '.join(names)})")


def parse_overrides(items: Sequence[str], error: ErrorType) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{"a.b": 1}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise error(f"--set {item!r}: expected KEY=VALUE, e.g. train.run.steps=100")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(d: Mapping[str, Any], overrides: Mapping[str, Any], error: ErrorType) -> dict[str, Any]:
    """A copy of ``d`` with dotted keys set: ``{"model.kind": "lce"}`` sets ``d["model"]["kind"]``."""
    out: dict[str, Any] = _deepcopy(d)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise error(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def build_dataclass(tp: Any, value: Any, where: str, error: ErrorType) -> Any:
    """Builds (nested) dataclass ``tp`` from plain data, strictly.

    Unknown keys, wrong types (a string where a number goes, a scalar where a list goes) and constructor
    errors are ``error`` naming the dotted key under ``where``. ``None`` for a dataclass gives its defaults;
    lists become tuples where the field is a tuple.
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, Mapping):
            raise error(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names)
        if unknown:
            raise error(f"{where}: unknown keys {unknown}; allowed {sorted(names)}")
        kwargs = {k: build_dataclass(hints[k], v, f"{where}.{k}", error) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as e:
            if isinstance(e, error):
                raise
            raise error(f"{where}: {e}") from None
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return build_dataclass(args[0], value, where, error)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(build_dataclass(args[0], v, f"{where}[{i}]", error) for i, v in enumerate(value))
        if len(value) != len(args):
            raise error(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(build_dataclass(a, v, f"{where}[{i}]", error) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise error(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (str, Any)
        return {
            build_dataclass(kt, k, f"{where}.{k}", error): build_dataclass(vt, v, f"{where}.{k}", error)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (tp is int and not float(value).is_integer())
        ):
            raise error(f"{where}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise error(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def to_plain(x: Any) -> Any:
    """A dataclass tree as plain dicts and lists (the inverse of :func:`build_dataclass`)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
    if isinstance(x, (tuple, list)):
        return [to_plain(v) for v in x]
    if isinstance(x, Mapping):
        return {k: to_plain(v) for k, v in x.items()}
    return x
