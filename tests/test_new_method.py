"""Adding a method is adding files: docs/extending.md's walk-through, performed in a scratch copy.

The method's module and its test are read from the fenced blocks of docs/extending.md (so the page
cannot drift from what works), its ``params.yaml`` entry is the one line the page gives. In the copy:
the tiny 2-D training runs first; then the three files are added (``git status`` shows those three
and nothing else); the new method's own test passes; ``dvc repro fig1_mog`` trains only the new
student, whose rows appear in the 2-D table at every NFE, while every other student's fingerprint
and checkpoint bytes stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=marflow-test", "-c", "user.email=test@invalid", "-c",
       "commit.gpgsign=false"]
STUDENT_LINE = (  # the 2-D tier's last student
    "    perflow_ma: {method: perflow, windows: 4, ma: true, ma_weight: null, ma_substeps: null, seeds: [0]}\n")


def walkthrough() -> tuple[dict[str, str], str]:
    """``({path: source}, params line)`` from docs/extending.md's method walk-through."""
    text = (ROOT / "docs" / "extending.md").read_text()
    files = dict(re.findall(r"```python\n# file: (\S+)\n(.*?)```", text, flags=re.S))
    (line,) = re.findall(r"```yaml\n(    reflow_huber: .*?\n)```", text, flags=re.S)
    return files, line


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _state(repo: Path) -> dict[str, tuple[str, str]]:
    """``{student: (fingerprint.json, sha256 of last.pt)}`` of every trained 2-D student."""
    out = {}
    for stamp in sorted((repo / "checkpoints" / "toy2d").glob("*/fingerprint.json")):
        last = stamp.parent / "last.pt"
        if last.exists():
            out[stamp.parent.name] = (stamp.read_text(), hashlib.sha256(last.read_bytes()).hexdigest())
    return out


def test_the_walkthrough_names_three_files():
    files, line = walkthrough()
    assert sorted(files) == ["replication/methods/reflow_huber.py", "tests/test_reflow_huber.py"]
    assert line.strip().startswith("reflow_huber: {method: reflow_huber")
    assert STUDENT_LINE in (ROOT / "params.yaml").read_text()


@pytest.mark.slow
def test_a_new_method_is_three_files_and_retrains_no_other_student(tmp_path):
    repo = tmp_path / "repo"
    _run([sys.executable, "-m", "replication.profile", "tiny", "--scratch", str(repo)], ROOT)
    _run([*GIT, "add", "-A"], repo)
    _run([*GIT, "commit", "-qm", "tiny"], repo)
    _run(["dvc", "repro", "toy2d_train"], repo)
    before = _state(repo)
    assert set(before) == {"reflow", "reflow_ma", "perflow", "perflow_ma"}

    files, line = walkthrough()
    for rel, source in files.items():
        (repo / rel).write_text(source)
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace(STUDENT_LINE, STUDENT_LINE + line, 1))
    changed = sorted(entry[3:] for entry in _run(["git", "status", "--porcelain", "-uall"], repo)
                     .stdout.splitlines() if not entry[3:].startswith(("results/", "dvc.lock")))
    assert changed == ["params.yaml", "replication/methods/reflow_huber.py", "tests/test_reflow_huber.py"]

    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_reflow_huber.py"],
         repo)
    _run(["dvc", "repro", "fig1_mog"], repo)
    after = _state(repo)
    assert {name: after[name] for name in before} == before, "an existing student was retrained"
    assert "reflow_huber" in after
    stamp = json.loads(after["reflow_huber"][0])
    assert stamp["student"]["method"] == "reflow_huber"

    table = json.loads((repo / "results/toy2d/fig1_mog/metrics.json").read_text())["table"]
    rows = {r["nfe"]: r for r in table if r["student"] == "reflow_huber"}
    nfe = json.loads(_run([sys.executable, "-c", "import json; from replication.config import "
                           "load_params; print(json.dumps(load_params()['toy2d_eval']['nfe']))"],
                          repo).stdout)
    assert sorted(rows) == sorted(nfe)
    assert all(r["method"] == "reflow_huber" and r["windows"] == 1 for r in rows.values())
