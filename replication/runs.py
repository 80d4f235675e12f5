"""Run folders of training stages: resumable only by the same params and the same training code."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from marflow_core.atomic import atomic_write_text


def source_digest(tier_dir: Path, training_sources: tuple[str, ...]) -> str:
    """SHA-256 of the library and of a tier's ``training_sources`` (file names in ``tier_dir``):
    checkpoints made by other training code are never resumed. Evaluation code is left out, so
    editing a metric re-runs evaluation without retraining."""
    import marflow_core

    digest = hashlib.sha256()
    library = sorted(Path(marflow_core.__file__).parent.glob("*.py"))
    tier = [Path(tier_dir) / name for name in training_sources]
    for path in [*library, *tier]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def prepare_run_dir(path: Path, fingerprint: dict) -> None:
    """Keep ``path``'s files (to resume) only if they were made with the same ``fingerprint``."""
    stamp = path / "fingerprint.json"
    text = json.dumps(fingerprint, indent=1, sort_keys=True)
    if path.exists() and (not stamp.exists() or stamp.read_text() != text):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, stamp)
