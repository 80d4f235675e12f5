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
