"""How the report prints a number, and the check that every printed number comes from an input.

``fmt`` is the one rounding of the report: an integer (or an integral float: a seed count of
``5.0``) prints as the integer; below ten in magnitude, three significant digits with the trailing
zeros kept (``0.383``, ``3.00``, ``7.91e-08``); from ten, two decimals (``22.97``); from a thousand,
one (``2017.1``). A missing value prints as ``MISSING``, never as zero. Published numbers are also
printed as written (``published``: ``20.1``, not ``20.10``).

``check_provenance(text, sources)`` finds every numeric token of ``text`` (a number not glued to a
word: ``toy2d``, ``nfe4``, ``8x8`` and ``fig1_mog`` hold none) and returns those that are neither a
rendering (``fmt`` or ``published``) of some number of ``sources`` nor a numeric token of one of
their strings (a source's own prose: ``ICLR 2025``, ``MDE 125``). An empty list means every number
of the report came from its inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

MISSING = "–"
#: a number standing alone: not preceded by a word character, a dot, a slash or a hyphen (``COCO-2017``
#: holds none), not followed by a word character; a minus after a space or punctuation is its sign
NUMBER = re.compile(r"(?<![\w.\-/])(?:(?:^|(?<=[\s(|:;,=±\[]))-)?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w)")


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any) -> str:
    """The report's rendering of a measured number (module doc); ``MISSING`` for None / NaN."""
    if not is_number(value):
        return MISSING
    if float(value).is_integer():
        return str(int(value))
    magnitude = abs(value)
    if magnitude < 10:
        return f"{value:#.3g}"
    if magnitude < 1000:
        return f"{value:.2f}"
    return f"{value:.1f}"


def published(value: Any) -> str:
    """A reference number as its source writes it (``unknown`` stays ``unknown``)."""
    if isinstance(value, str):
        return value
    if not is_number(value):
        return MISSING
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def plus_minus(mean: Any, half_width: Any) -> str:
    """``mean ± half_width``, the mean alone when the interval is missing, ``MISSING`` without a mean."""
    if not is_number(mean):
        return MISSING
    return fmt(mean) if not is_number(half_width) else f"{fmt(mean)} ± {fmt(half_width)}"


def tokens(text: str) -> list[str]:
    """The numeric tokens of ``text`` (module doc)."""
    return [m.group(0) for m in NUMBER.finditer(text)]


def _walk(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _walk(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _walk(value)
    else:
        yield node


def allowed_tokens(sources: Iterable[Any]) -> set[str]:
    """Every string the report may print as a number: the renderings of the sources' numbers and the
    numeric tokens of their strings (keys included)."""
    allowed: set[str] = set()
    for source in sources:
        for leaf in _walk(source):
            if isinstance(leaf, str):
                allowed.update(tokens(leaf))
            elif is_number(leaf):
                allowed.update((fmt(leaf), published(leaf)))
    return allowed


def check_provenance(text: str, sources: Iterable[Any]) -> list[str]:
    """The numeric tokens of ``text`` found in no source (empty: every number has a source)."""
    allowed = allowed_tokens(sources)
    return [tok for tok in tokens(text) if tok not in allowed]
