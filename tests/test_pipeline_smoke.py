"""Smoke run of the whole DVC pipeline on the tiny profile, in a temporary copy of the repository.

Checks that `dvc repro` runs every stage, that the executed notebooks have no error cells and that
their metrics and figures exist, and that a second `dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files, without the committed results."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return [f for f in out if f and not f.startswith("results/") and f != "dvc.lock"
            and (ROOT / f).is_file()]


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_tiny_profile_pipeline_end_to_end(tmp_path):
    if shutil.which("git") is None or shutil.which("dvc") is None:
        pytest.fail("git and dvc must be installed (see README)")
    repo = tmp_path / "repo"
    for rel in _project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "replication.profile", "tiny"], repo)

    _run(["dvc", "repro"], repo)

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for out in stage["outs"]:
            path = repo / (out if isinstance(out, str) else next(iter(out)))
            assert path.exists(), f"{name}: missing output {path}"
            if path.suffix == ".ipynb":
                nb = nbformat.read(path, as_version=4)
                errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                          if o.get("output_type") == "error"]
                assert not errors, f"{path.name} has error cells: {errors[0].get('ename')}"
        for entry in stage.get("metrics", []):
            data = json.loads((repo / next(iter(entry))).read_text())
            assert data, f"{name}: empty metrics"
        for entry in stage.get("plots", []):
            png = repo / next(iter(entry))
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"

    fig1 = json.loads((repo / "results/toy2d/fig1_mog/metrics.json").read_text())
    students = {row["student"] for row in fig1["table"]}
    assert students == {"reflow", "reflow_ma", "perflow", "perflow_ma"}
    assert {row["nfe"] for row in fig1["table"]} == {1, 2, 4, 8}

    again = _run(["dvc", "repro"], repo)
    assert "Running stage" not in again.stdout, again.stdout
    status = _run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout
