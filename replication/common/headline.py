"""Headline metrics are finite, or the row says in words why not: a NaN never passes as a result.

A metric that comes out NaN, infinite or missing where it was computed means something broke (NaN
weights, a diverging solver); written to ``metrics.json`` it would read as ``null`` and the stage
would succeed. ``check_finite`` makes the stage fail instead, naming the row and the metric, unless
the row carries a ``status`` other than ``"ok"``: an expected failure of the method (a folded map
whose density is undefined), which the table prints beside the row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

OK = "ok"


class MetricError(RuntimeError):
    """A headline metric that is NaN, infinite or missing in a row that claims to be fine."""


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_finite(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], where: str,
                 keys: Sequence[str] = ("student", "method", "nfe")) -> None:
    """Raise ``MetricError`` for the first row (with ``status`` absent or ``"ok"``) whose
    ``columns`` are not all finite numbers; the message names ``where``, the row by its ``keys``
    and the metric."""
    for row in rows:
        if row.get("status", OK) != OK:
            continue
        for column in columns:
            if not _finite(row.get(column)):
                name = ", ".join(f"{k} {row[k]}" for k in keys if k in row)
                raise MetricError(f"{where}: {column} = {row.get(column)!r} for {name}: a headline metric "
                                  f"must be a finite number (NaN weights or a diverging solve upstream?); "
                                  f"nothing was written")
