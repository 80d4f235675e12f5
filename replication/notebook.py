"""Helpers for the thin notebooks: validated configs, atomic metrics and figures, wall times."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from marflow_core.atomic import atomic_write_text

from .config import load_params
from .registry import section
from .reproducible import wall_time_line


def stage_configs(params: dict[str, Any] | None, sections: list[str], path: str = "params.yaml"):
    """Validated dataclasses of ``sections``; ``params`` None (interactive use) reads ``params.yaml``."""
    params = load_params(path) if params is None else params
    return tuple(section(params, name) for name in sections)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def save_json(data: Any, path: str | Path) -> None:
    """Atomic, sorted-keys JSON (non-finite floats become null)."""
    atomic_write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n", path)


def write_text(text: str, path: str | Path) -> None:
    """Atomic text output (a generated markdown summary, say)."""
    atomic_write_text(text, path)


def save_figure(fig, path: str | Path, dpi: int = 130) -> None:
    """Save a matplotlib figure as PNG with fixed metadata, so reruns give identical bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})


def print_wall_time(label: str, seconds: float, note: str = "") -> None:
    """Print a wall time (and a run-dependent ``note``) in the form the stage runner strips from
    the committed notebook: ``[wall time] label: 12.3 s (note)``."""
    print(wall_time_line(label, seconds) + (f" ({note})" if note else ""))


def setup_plotting() -> None:
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
