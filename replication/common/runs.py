"""Run folders of training stages: resumable only by the same params and the same training code
(a run's ``fingerprint`` holds its config and its ``fingerprint.code_digest``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from marflow_core.atomic import atomic_write_text


def prepare_run_dir(path: Path, fingerprint: dict) -> None:
    """Keep ``path``'s files (to resume) only if they were made with the same ``fingerprint``."""
    stamp = path / "fingerprint.json"
    text = json.dumps(fingerprint, indent=1, sort_keys=True)
    if path.exists() and (not stamp.exists() or stamp.read_text() != text):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, stamp)


class StaleRunError(RuntimeError):
    """A run folder whose checkpoints were made with other params or other code than the stage's."""


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else
                                                                        str(key)).items()}
    return {prefix: node}


def check_run_dir(path: Path, expected: dict, rebuild: str) -> None:
    """Refuse to use the checkpoints in ``path`` unless its ``fingerprint.json`` holds ``expected``
    (every key of ``expected``, recursively, with the same value; a stage that reads only some of
    the training params checks those). ``rebuild`` says what the user runs instead."""
    stamp = path / "fingerprint.json"
    if not stamp.is_file():
        raise StaleRunError(f"{path}: no fingerprint.json, so nothing says which params and code made "
                            f"these checkpoints; {rebuild}")
    saved = _leaves(json.loads(stamp.read_text()))
    for key, value in _leaves(json.loads(json.dumps(expected))).items():
        if key not in saved or saved[key] != value:
            there = saved.get(key, "(absent)")
            raise StaleRunError(f"{path}: made with {key} = {there!r}, but the params and code now give "
                                f"{value!r}; {rebuild}")
