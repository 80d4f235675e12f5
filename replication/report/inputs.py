"""The files the report reads: the stages' metrics files (each present, skipped by design, or not
run yet), the sensitivity figure and the executed notebooks.

``load_inputs(root)`` reads every file of ``FILES`` and each sweep family's
``results/toy2d/sweep/<family>/metrics.json`` that exists; an absent file is ``not run`` (the
report says so and the headline leaves it out), a ``{"skipped": reason}`` file is a stage skipped by
design. ``need`` reads a key of an input and names the file and the key when the schema differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: logical name -> path (relative to the repository root) of every metrics file the report reads
FILES: dict[str, str] = {
    "fig1": "results/toy2d/fig1_mog/metrics.json",
    "tv_bound": "results/toy2d/tv_bound/metrics.json",
    "underdetermination": "results/toy2d/underdetermination/metrics.json",
    "test": "results/toy2d/test/metrics.json",
    "ablation": "results/toy2d/ablation/metrics.json",
    "related": "results/toy2d/related/metrics.json",
    "images_table": "results/images/table/metrics.json",
}
SWEEP_DIR = "results/toy2d/sweep"
SENSITIVITY_FIGURE = "results/toy2d/sensitivity/sensitivity.png"
NOT_RUN = "not run"


class ReportInputError(ValueError):
    """An input whose contents are not what the report reads (the message names file and key)."""


@dataclass(frozen=True)
class Input:
    """One metrics file: ``path`` (relative), its ``data`` (None when absent or skipped) and why not."""

    path: str
    data: dict[str, Any] | None
    status: str  # "read", NOT_RUN, or "skipped: <reason>"

    @property
    def ok(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class Inputs:
    """Everything the report reads (``files`` by logical name, ``sweeps`` by family)."""

    files: dict[str, Input]
    sweeps: dict[str, Input] = field(default_factory=dict)
    sensitivity_figure: str | None = None
    notebooks: tuple[str, ...] = ()

    def get(self, name: str) -> dict[str, Any] | None:
        return self.files[name].data if name in self.files else None

    def all(self) -> list[Input]:
        return [*self.files.values(), *self.sweeps.values()]


def read_input(root: Path, rel: str) -> Input:
    path = root / rel
    if not path.is_file():
        return Input(rel, None, NOT_RUN)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportInputError(f"{rel}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ReportInputError(f"{rel}: expected a JSON object, got {type(data).__name__}")
    if set(data) == {"skipped"}:
        return Input(rel, None, f"skipped: {data['skipped']}")
    return Input(rel, data, "read")


def load_inputs(root: Path, report_dir: str = "results/report") -> Inputs:
    """Every input under ``root``; ``notebooks``: each executed notebook below ``results/`` (not the
    report's own, nor hidden or failed runs), sorted."""
    root = Path(root)
    files = {name: read_input(root, rel) for name, rel in FILES.items()}
    sweep_root = root / SWEEP_DIR
    sweeps = {p.parent.name: read_input(root, str(p.relative_to(root)))
              for p in sorted(sweep_root.glob("*/metrics.json"))} if sweep_root.is_dir() else {}
    figure = SENSITIVITY_FIGURE if (root / SENSITIVITY_FIGURE).is_file() else None
    notebooks = tuple(sorted(str(p.relative_to(root)) for p in (root / "results").glob("**/*.ipynb")
                             if not any(part.startswith(".") for part in p.relative_to(root).parts)
                             and not p.is_relative_to(root / report_dir)))
    return Inputs(files, sweeps, figure, notebooks)


def need(data: dict[str, Any], key: str, where: str) -> Any:
    """``data[key]``, or ``ReportInputError`` naming ``where`` (file and position) and the key."""
    if not isinstance(data, dict) or key not in data:
        known = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ReportInputError(f"{where}: no key {key!r} (found {known}); the report's section for this "
                               f"file (replication/report/build.py) must follow the file's schema")
    return data[key]
