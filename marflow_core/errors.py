"""Errors shared by the library's configs."""

from __future__ import annotations

from typing import Any


class InvalidParameter(ValueError):
    """A config value out of its domain; ``key``, ``value`` and ``why`` let callers name the full path."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"{key}={value!r}: {why}")
        self.key, self.value, self.why = key, value, why
