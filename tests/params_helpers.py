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
