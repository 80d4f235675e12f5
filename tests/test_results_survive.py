"""Committed results survive a stage that fails under ``dvc repro``: rejected params, a command that
fails at run time, and Ctrl-C (SIGINT to the whole process group, as a terminal sends it).

Each case runs in a scratch git copy of the project (tiny profile) whose ``results/`` are the
committed ones; after the failure every committed results file is byte-identical, ``dvc.lock`` is
unchanged, and ``dvc status`` still reports the stage as changed (nothing was recorded as done).
Before outputs were ``persist: true``, DVC deleted a stage's ``cache: false`` results before running
its command, so each of these failures lost them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


def _snapshot(repo: Path) -> dict[str, str]:
    """sha256 of every file under ``results/`` (the failed-run folder aside) and of ``dvc.lock``."""
    files = [p for p in (repo / "results").rglob("*") if p.is_file() and ".failed" not in p.parts]
    files.append(repo / "dvc.lock")
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The scratch copy and the snapshot of its committed results, which every case must keep."""
    target = tmp_path_factory.mktemp("survive") / "repo"
    subprocess.run([sys.executable, "-m", "replication.profile", "tiny", "--scratch", str(target)],
                   cwd=ROOT, check=True, capture_output=True)
    tracked = subprocess.run(["git", "ls-files", "results", "dvc.lock"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
    for rel in tracked:  # the scratch copy leaves results out: bring in the committed ones
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target / rel)
    assert (target / "results" / "toy2d" / "tv_bound" / "metrics.json").exists()
    (target / "checkpoints" / "toy2d").mkdir(parents=True)  # a dependency that exists, but empty
    return target, _snapshot(target)


def _repro(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "repro", *args], cwd=repo, env=_env(repo), capture_output=True,
                          text=True, timeout=600)


def _still_reported(repo: Path, stage: str) -> None:
    status = subprocess.run(["dvc", "status", stage], cwd=repo, env=_env(repo), capture_output=True,
                            text=True, timeout=120).stdout
    assert f"{stage}:" in status, status


def test_a_rejected_param_keeps_the_results(repo):
    repo, committed = repo
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("steps_per_window: 1", "steps_per_window: 0", 1))
    try:
        proc = _repro(repo, "-s", "tv_bound")
        assert proc.returncode != 0
        assert "tv_bound.steps_per_window = 0: must be >= 1" in proc.stderr + proc.stdout
        assert _snapshot(repo) == committed
        _still_reported(repo, "tv_bound")
    finally:
        (repo / "params.yaml").write_text(params)


def test_a_failing_command_keeps_the_results(repo):
    """No trained students in the scratch copy: the notebook fails at run time, after validation."""
    repo, committed = repo
    assert not any((repo / "checkpoints").rglob("last.pt"))
    proc = _repro(repo, "-s", "tv_bound")
    assert proc.returncode != 0
    assert _snapshot(repo) == committed
    assert (repo / "results" / ".failed" / "tv_bound").is_dir()  # the partial notebook, for debugging
    _still_reported(repo, "tv_bound")


def test_ctrl_c_keeps_the_results(repo):
    """Ctrl-C in the middle of training: the stage fails, the committed results stay. The tiny
    profile trains in about a second, so the run is lengthened (100x the steps) for the interrupt
    to land inside training every time, not after the stage has finished (the last case of the
    module: the profile is restored, the interrupted run folders stay behind)."""
    repo, committed = repo
    profile = repo / "replication" / "profiles" / "tiny.yaml"
    original = profile.read_text()
    assert "toy2d_train:\n  steps: 40\n" in original
    profile.write_text(original.replace("toy2d_train:\n  steps: 40\n", "toy2d_train:\n  steps: 4000\n", 1))
    try:
        # SIGINT back to its default in the child: a test run started in the background (`cmd &` in a
        # script) inherits SIGINT ignored, and an ignored signal stays ignored across exec
        proc = subprocess.Popen(["dvc", "repro", "-s", "toy2d_train"], cwd=repo, env=_env(repo),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not list((repo / "checkpoints").glob("toy2d/*/fingerprint.json")):
            assert proc.poll() is None, "dvc repro ended before training started"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # inside the first student's 4000 steps
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0
    finally:
        profile.write_text(original)
    time.sleep(2)
    assert _snapshot(repo) == committed
    _still_reported(repo, "toy2d_train")
