"""The outputs of a stage skipped by design: every output DVC expects, each saying why in words.

A stage that cannot run on these params (``StageSpec.skip_rules``: an unlabelled image folder and a
stage that needs labels) still has to leave every output ``dvc.yaml`` declares, or DVC fails. Each
is written here, and each says the stage was skipped and why: a one-cell notebook, a
``{"skipped": reason}`` JSON, a figure showing the sentence, a CSV with it, an empty folder for a
checkpoint folder. Nothing in them is a number.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def declared_outputs(stage: str, root: Path) -> list[str]:
    """The ``outs``, ``metrics`` and ``plots`` paths of ``stage`` in ``root/dvc.yaml``."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    entries = [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def write_placeholder(path: Path, stage: str, reason: str) -> None:
    """One output of a skipped stage, by its kind (suffix); a path without suffix is a folder."""
    text = f"stage {stage} skipped: {reason}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == "":
        path.mkdir(exist_ok=True)
    elif path.suffix == ".ipynb":
        import nbformat

        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {stage}: skipped\n\n{reason}")])
        nbformat.write(nb, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
    elif path.suffix == ".png":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(6, 1.2))
        fig.text(0.02, 0.5, "\n".join(_wrap(text, 90)), va="center", fontsize=9)
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
    else:
        path.write_text(f"skipped\n{reason}\n")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def write_skipped(stage: str, reason: str, out_dir: str, tmp_dir: Path, root: Path) -> None:
    """Every declared output of ``stage``: those under its results folder ``out_dir`` into
    ``tmp_dir`` (swapped in by the runner), the others (checkpoint folders) in place."""
    for rel in declared_outputs(stage, root):
        inside = Path(rel).is_relative_to(out_dir)
        target = tmp_dir / Path(rel).relative_to(out_dir) if inside else root / rel
        if inside or not target.exists():
            write_placeholder(target, stage, reason)
