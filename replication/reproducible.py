"""Make an executed notebook a pure function of code, params and seed, so a rerun leaves git clean.

Papermill and Jupyter record what changes from run to run: random cell ids, timestamps and
durations, the temporary folder a stage ran in, absolute paths, progress-bar frames. Notebooks print
wall times through ``wall_time_line`` so that they can be recognised. ``scrub_notebook`` removes or
normalises all of these and keeps everything a reader needs: sources, parameters, results, figures.
"""

from __future__ import annotations

import re
from typing import Any

WALL_TIME_TAG = "[wall time]"
WALL_TIME_STRIPPED = "(not kept in the committed notebook: it varies from run to run)"
_WALL_TIME = re.compile(re.escape(WALL_TIME_TAG) + r"([^\n]*?): [^\n]*")
# a tqdm frame: "desc:  42%|####      | 42/100 [00:01<00:02, 30.1it/s, loss=0.1]"
_PROGRESS = re.compile(r"\d+%\|[^\n|]*\|[^\n]*\[[^\n]*\]")
_KEEP_NOTEBOOK_METADATA = ("jupytext", "kernelspec", "language_info")


def wall_time_line(label: str, seconds: float) -> str:
    """``[wall time] label: 12.3 s``: printed by notebooks, normalised by ``scrub_notebook``."""
    return f"{WALL_TIME_TAG} {label}: {seconds:.1f} s"


def terminal_text(text: str) -> str:
    """What a terminal shows: per line, only the text after the last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def scrub_text(text: str, replacements: dict[str, str]) -> str:
    """Apply path ``replacements``, drop progress-bar lines, normalise wall-time lines."""
    for old, new in replacements.items():
        text = text.replace(old, new)
    lines = [line for line in terminal_text(text).split("\n") if not _PROGRESS.search(line)]
    return _WALL_TIME.sub(lambda m: f"{WALL_TIME_TAG}{m.group(1)}: {WALL_TIME_STRIPPED}", "\n".join(lines))


def _scrub_value(value: Any, replacements: dict[str, str]) -> Any:
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_scrub_value(v, replacements) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v, replacements) for k, v in value.items()}
    return value


def _merge_streams(outputs: list[dict]) -> list[dict]:
    """Consecutive stream outputs of the same name as one output (as a terminal would show them)."""
    merged: list[dict] = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None
                and prev.get("output_type") == "stream" and prev.get("name") == out.get("name")):
            prev["text"] = prev["text"] + out["text"]
        else:
            merged.append(dict(out))
    return merged


def scrub_notebook(nb, replacements: dict[str, str]):
    """Normalise an executed nbformat notebook in place (and return it).

    ``replacements`` maps volatile strings (the temporary results folder, the repository's absolute
    path) to stable ones. Cell ids become ``cell-000``, ``cell-001``, ...; execution timestamps and
    papermill's timing metadata are dropped (the injected parameters are kept); streams are merged,
    progress frames removed and wall times normalised; empty streams disappear.
    """
    parameters = nb.metadata.get("papermill", {}).get("parameters")
    nb.metadata = type(nb.metadata)({k: v for k, v in nb.metadata.items() if k in _KEEP_NOTEBOOK_METADATA})
    if parameters is not None:
        nb.metadata["papermill"] = {"parameters": _scrub_value(parameters, replacements)}
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{index:03d}"
        cell["metadata"] = type(cell["metadata"])(
            {k: v for k, v in cell["metadata"].items() if k not in ("execution", "papermill")})
        cell["source"] = _scrub_value(cell["source"], replacements)
        if cell["cell_type"] != "code":
            continue
        outputs = []
        for out in _merge_streams(cell.get("outputs", [])):
            if out.get("output_type") == "stream":
                out["text"] = scrub_text(out["text"], replacements)
                if not out["text"].strip():
                    continue
            else:
                out = _scrub_value(out, replacements)
            outputs.append(out)
        cell["outputs"] = outputs
    return nb
