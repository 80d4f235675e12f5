"""Helpers shared by the params tests."""

from __future__ import annotations

import copy
from typing import Any


def with_value(params: dict, keys: tuple, value: Any) -> dict:
    """A deep copy of ``params`` with the entry at key path ``keys`` set to ``value``."""
    params = copy.deepcopy(params)
    node = params
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return params


def _dataclass_in(hint: Any):
    """``(kind, cls)`` when ``hint`` is a dataclass, a ``dict[str, dataclass]`` or a ``list[dataclass]``."""
    import dataclasses
    import typing

    if dataclasses.is_dataclass(hint):
        return "one", hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict and args and dataclasses.is_dataclass(args[-1]):
        return "dict", args[-1]
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return "list", args[0]
    return None, None


def _plain(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _fill(cls: type, data: dict, path: tuple, added: set) -> dict:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in (f for f in dataclasses.fields(cls) if f.init):
        kind, sub = _dataclass_in(hints[f.name])
        if f.name in out:
            value = out[f.name]
            if kind == "one" and isinstance(value, dict):
                out[f.name] = _fill(sub, value, (*path, f.name), added)
            elif kind == "dict" and isinstance(value, dict):
                out[f.name] = {k: _fill(sub, v, (*path, f.name, k), added) if isinstance(v, dict) else v
                               for k, v in value.items()}
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = _plain(default)
            _mark((*path, f.name), out[f.name], added)
    return out


def _mark(path: tuple, value: Any, added: set) -> None:
    """Record ``path`` and every key path under it as added."""
    added.add(path)
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark((*path, key), sub, added)


def _bare(cls: type, data: Any) -> Any:
    """An instance of dataclass ``cls`` holding ``data`` (nested dataclasses too), built without
    running its checks: enough to ask it for its ``inactive_fields``."""
    import typing

    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    obj = object.__new__(cls)
    for name, value in data.items():
        kind, sub = _dataclass_in(hints.get(name, Any))
        if kind == "one":
            value = _bare(sub, value)
        elif kind == "dict" and isinstance(value, dict):
            value = {k: _bare(sub, v) for k, v in value.items()}
        object.__setattr__(obj, name, value)
    return obj


def _strip_inactive(cls: type, data: dict, added: set, path: tuple = ()) -> dict:
    """``data`` without the keys added by ``_fill`` that have no effect given the others."""
    import typing

    hints = typing.get_type_hints(cls)
    try:
        inactive = _bare(cls, data).inactive_fields() if hasattr(cls, "inactive_fields") else {}
    except Exception:  # a value put in on purpose to be refused: leave the section as it is
        inactive = {}
    out = {k: v for k, v in data.items() if not (k in inactive and (*path, k) in added)}
    for name, value in out.items():
        kind, sub = _dataclass_in(hints.get(name, Any))
        if kind == "one" and isinstance(value, dict):
            out[name] = _strip_inactive(sub, value, added, (*path, name))
        elif kind == "dict" and isinstance(value, dict):
            out[name] = {k: _strip_inactive(sub, v, added, (*path, name, k)) if isinstance(v, dict) else v
                         for k, v in value.items()}
    return out


def fill_defaults(cls: type, data: dict) -> dict:
    """Section ``data`` of dataclass ``cls`` with every missing key set to the code's default, as a
    params file must spell it; added keys that have no effect given the others are left out. Bad
    values the caller put in on purpose are left as they are (fixtures of error tests)."""
    added: set = set()
    return _strip_inactive(cls, _fill(cls, copy.deepcopy(data), (), added), added)
