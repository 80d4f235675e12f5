"""Typed, validated views of ``params.yaml`` sections.

Every section maps one-to-one onto a dataclass. Construction validates: an unknown key or a bad value
raises ``ConfigError`` naming the full key path and the value (``toy2d_train.steps = -5: must be
>= 1``), so a stage stops before doing any work. The checks of a value's domain live in the
dataclass (most of them library dataclasses, whose ``InvalidParameter`` is mapped to the key path
here); this module only maps and type-checks.

No input is silently ignored: a dataclass may define ``inactive_fields() -> {field: reason}``, the
fields that have no effect given the others (for example the divergence of the MA term under
``logdet: discrete``); such a key present in ``params.yaml`` is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from marflow_core.errors import InvalidParameter

from .params_yaml import ParamsYAMLError, read_yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad ``params.yaml`` entry; the message names the key path and the value."""


def fail(where: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{where} = {value!r}: {why}")


def require(ok: bool, where: str, value: Any, why: str) -> None:
    if not ok:
        fail(where, value, why)


def require_each(obj: Any, where: str, keys: tuple[str, ...], ok, why: str) -> None:
    """``require(ok(obj.key), ...)`` for every field ``key`` in ``keys``."""
    for key in keys:
        require(ok(getattr(obj, key)), f"{where}.{key}", getattr(obj, key), why)


def check_nfe_list(values: list[int], where: str, allow_empty: bool = False) -> None:
    """A list of step counts: non-empty (unless ``allow_empty``), each >= 1, none repeated."""
    require(allow_empty or len(values) >= 1, where, values,
            "list at least one NFE (an empty list evaluates nothing)")
    for i, n in enumerate(values):
        require(n >= 1, f"{where}[{i}]", n, "an NFE (number of steps) must be >= 1")
    repeated = sorted({n for n in values if values.count(n) > 1})
    require(not repeated, where, values, f"{repeated} listed more than once: list each NFE once")


def check_name_list(values: list[str], where: str, what: str = "student") -> None:
    """A list of names: non-empty and none repeated."""
    require(len(values) >= 1, where, values, f"list at least one {what} (an empty list evaluates nothing)")
    repeated = sorted({n for n in values if values.count(n) > 1})
    require(not repeated, where, values, f"{repeated} listed more than once")


def check_device(device: str, where: str) -> None:
    """``cpu``, or ``cuda`` / ``cuda:N`` on a machine where that CUDA device exists."""
    import re

    import torch

    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    require(device == "cpu" or match is not None, where, device, "must be 'cpu', 'cuda' or 'cuda:N'")
    if match is not None:
        require(torch.cuda.is_available(), where, device,
                "CUDA is not available on this machine (torch.cuda.is_available() is False); use 'cpu'")
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        require(index < count, where, device, f"this machine has {count} CUDA device(s)")


#: profile overlays: ``replication/profiles/<name>.yaml``, merged over ``params.yaml`` at load time
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "default"


def profile_path(name: str, profiles_dir: Path = PROFILES_DIR) -> Path:
    """The overlay file of profile ``name``; an unknown name raises ``ConfigError`` listing the known."""
    path = Path(profiles_dir) / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        raise ConfigError(f"profile = {name!r}: no {path}; known profiles: {known}")
    return path


def load_params(path: str | Path = "params.yaml", overlay: bool = True,
                profiles_dir: Path = PROFILES_DIR) -> dict[str, Any]:
    """A params file as a dict, with its profile's overlay merged in.

    A file whose top-level ``profile`` names a profile other than ``default`` gets
    ``replication/profiles/<profile>.yaml`` deep-merged over it (``overlay=False``: the file as
    written), so switching profile changes one line of ``params.yaml`` and nothing else. A missing
    or unparsable file raises ``ConfigError``."""
    data = _read_mapping(Path(path))
    name = data.get("profile", DEFAULT_PROFILE)
    if overlay and name != DEFAULT_PROFILE:
        extra = _read_mapping(profile_path(name, profiles_dir))
        require("profile" not in extra, f"{profile_path(name, profiles_dir).name}: profile", extra.get("profile"),
                "an overlay does not set the profile (params.yaml does)")
        data = deep_merge(data, extra)
    return data


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; a missing or unparsable file raises ``ConfigError``."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the repository root, or pass "
                          f"--params PATH)")
    try:
        data = read_yaml(path)
    except ParamsYAMLError as err:
        raise ConfigError(str(err)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _check_type(value: Any, hint: Any, where: str, complete: bool = True) -> Any:
    """Check (and gently coerce int -> float) ``value`` against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where, complete)
            except ConfigError:
                continue
        fail(where, value, f"expected {hint}")
    if origin in (list, tuple):
        require(isinstance(value, list | tuple), where, value, "expected a list")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]", complete) for i, v in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), where, value, "expected a mapping")
        _, item = typing.get_args(hint)
        return {k: _check_type(v, item, f"{where}.{k}", complete) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, complete)
    if hint is Any:
        return value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        require(ok, where, value, "expected a number")
        require(math.isfinite(value), where, value, "expected a finite number")
        return float(value)
    if hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), where, value, "expected an integer")
        return value
    if hint is bool:
        require(isinstance(value, bool), where, value, "expected true or false")
        return value
    if hint is str:
        require(isinstance(value, str), where, value, "expected a string")
        return value
    return value


def from_dict(cls: type[T], data: Any, where: str, complete: bool = True) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and bad values raise ``ConfigError``.

    ``complete``: every field must be given (those without effect given the others excepted, which
    must be absent), as in a params file; ``complete=False`` fills in the dataclasses' defaults (for
    code that builds a section from a few keys, see ``written_out``)."""
    require(isinstance(data, dict), where, data, f"expected a mapping for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        fail(f"{where}.{unknown[0]}", data[unknown[0]], f"unknown key; known keys: {sorted(fields)}")
    kwargs, refused = {}, {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}", complete)
            except ConfigError as err:  # reported below, unless the key has no effect at all
                refused[name] = err
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing_keys(where, [name], {})
    absent = [name for name in fields if name not in data] if complete else []
    obj = _construct(cls, kwargs, where, refused, absent)
    inactive = obj.inactive_fields() if hasattr(obj, "inactive_fields") else {}
    if refused and not set(refused) & set(inactive):
        raise next(iter(refused.values()))
    missing = [name for name in fields if name not in data and name not in inactive]
    if missing and complete:
        missing_keys(where, missing, {name: getattr(obj, name) for name in missing})
    if not refused:
        _validate(obj, where)
    given = {key: why for key, why in inactive.items() if key in data}
    if given:
        key = sorted(given)[0]
        fail(f"{where}.{key}", data[key], f"has no effect: {given[key]}; remove "
             f"{'these keys' if len(given) > 1 else 'it'}: {sorted(given)}")
    return obj


def _construct(cls: type[T], kwargs: dict[str, Any], where: str, refused: dict[str, ConfigError],
               absent: list[str]) -> T:
    """``cls(**kwargs)`` (validated here only with ``refused`` keys, left at their defaults, when a
    failure is reported as the first refused key's own error; else the caller validates once the
    section is known to be complete)."""
    try:
        obj = cls(**kwargs)
        if refused:
            _validate(obj, where)
    except (InvalidParameter, ConfigError, TypeError) as err:
        if refused:
            raise next(iter(refused.values())) from None
        if isinstance(err, InvalidParameter):
            if err.key in absent:  # the default the dataclass filled in is what it refused
                missing_keys(where, [err.key], {})
            fail(f"{where}.{err.key}", err.value, err.why)
        raise
    return obj


def _validate(obj: Any, where: str) -> None:
    """``obj.validate(where)`` where defined, its ``InvalidParameter`` mapped to the key path."""
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate(where)
    except InvalidParameter as err:
        fail(f"{where}.{err.key}", err.value, err.why)


def missing_keys(where: str, names: list[str], defaults: dict[str, Any]) -> typing.NoReturn:
    """Refuse a section without ``names``: every parameter a stage reads is written in the params
    file, never filled in from a code default the user does not see."""
    hint = "; ".join(f"{name}: {defaults[name]!r}" for name in names if name in defaults)
    raise ConfigError(
        f"{where}.{names[0]}: required key is missing"
        + (f" (missing: {names})" if len(names) > 1 else "")
        + "; every parameter a stage reads is written out in the params file"
        + (f" (the library's defaults would be {hint})" if hint else ""))


def written_out(cls: type, data: dict[str, Any], where: str = "section") -> dict[str, Any]:
    """Section ``data`` of dataclass ``cls`` with every default written out (and every key without
    effect left out): what a params file must hold for ``data``'s meaning."""
    return _as_params(from_dict(cls, data, where, complete=False))


def _as_params(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        inactive = obj.inactive_fields() if hasattr(obj, "inactive_fields") else {}
        return {f.name: _as_params(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.init and f.name not in inactive}
    if isinstance(obj, dict):
        return {k: _as_params(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_as_params(v) for v in obj]
    return obj


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``override`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
