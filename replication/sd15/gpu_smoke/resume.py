"""Kill and resume the real training stage: ``python -m replication.stage sd15_train`` in a
subprocess, killed with SIGKILL, then run again.

The first run checkpoints every ``checkpoint_step`` steps and would train far longer; once its log
shows the step after its first checkpoint, its process group gets SIGKILL (no clean-up of any kind
runs). The second run, with ``steps`` = that checkpoint + ``resume_steps`` (``steps`` may change on
resume), must report resuming at the newest complete checkpoint, keep the log rows up to it and
log exactly the steps after it, reach the final step with finite losses and write its pipeline and
its ``finished.json``. The checkpoint's size on disk is
measured before the second run can replace it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..train import FINISHED, latest_checkpoint
from .device import describe
from .plan import SmokePlan
from .report import ResumeCheck
from .training import Inputs, case_config, case_section, read_log

REPO_ROOT = Path(__file__).resolve().parents[3]
RESUMED = re.compile(r"resumed from (?P<path>\S+) at step (?P<step>\d+)")
#: steps the first run is configured for: it is killed long before
FIRST_RUN_STEPS = 10_000


def stage_command(params: Path) -> list[str]:
    return [sys.executable, "-m", "replication.stage", "sd15_train", "--params", str(params), "--quiet"]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_params(cfg_section: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump({"sd15_train": cfg_section}, sort_keys=False))
    return path


def _section(recipe: dict, plan: SmokePlan, inputs: Inputs, out: Path, steps: int) -> dict:
    """The ``sd15_train`` section of one run (validated here, before any process starts)."""
    r = plan.resume
    args = (recipe, plan, r.ma, r.mixed_precision, r.batch_size, None, out, inputs, steps,
            {**r.overrides, "checkpoint_every": r.checkpoint_step})
    case_config(*args, where="gpu_smoke.resume")
    return case_section(*args)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it was started with ``start_new_session``: its data-loader
    workers go with it) and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    """SIGKILL ``proc``'s process group once ``ready()``; False if it exited or timed out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            kill_group(proc)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll_s)
    kill_group(proc)
    return False


def checkpoint_files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def run_resume(plan: SmokePlan, recipe: dict, inputs: Inputs, device_label: str, torch_version: str,
               log: Callable[[str], None] = print) -> ResumeCheck:
    """The kill-and-resume check; never raises (an exception is the entry's ``reason``)."""
    r = plan.resume
    tic = time.perf_counter()
    entry = ResumeCheck(device=device_label, torch=torch_version, wall_s=0.0, status="ok",
                        method="perflow_ma" if r.ma else "perflow", mixed_precision=r.mixed_precision,
                        batch_size=r.batch_size)
    try:
        _run(plan, recipe, inputs, entry, log)
    except Exception as err:  # noqa: BLE001 (recorded; the run goes on)
        entry.status, entry.reason = "error", describe(err)
    entry.wall_s = time.perf_counter() - tic
    return entry


def _run(plan: SmokePlan, recipe: dict, inputs: Inputs, entry: ResumeCheck, log: Callable[[str], None]) -> None:
    r = plan.resume
    root = inputs.work_dir / "resume"
    out = root / "run"
    root.mkdir(parents=True, exist_ok=True)
    first = write_params(_section(recipe, plan, inputs, out, FIRST_RUN_STEPS), root / "first.yaml")
    log(f"[gpu_smoke] resume: first run, killed after step {r.checkpoint_step + 1} ...")
    tic = time.perf_counter()
    with open(root / "first.log", "w") as fh:
        proc = subprocess.Popen(stage_command(first), cwd=REPO_ROOT, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            rows = read_log(out)
            return bool(rows) and rows[-1]["step"] > r.checkpoint_step and latest_checkpoint(out) is not None

        killed = kill_when(proc, ready, r.timeout_s)
    entry.first_run_s = time.perf_counter() - tic
    entry.first_exit = proc.returncode
    before = read_log(out)
    if not killed:
        entry.status = "failed"
        entry.reason = (f"the first run exited (status {proc.returncode}) or timed out before its step "
                        f"{r.checkpoint_step + 1}: {_tail(root / 'first.log')}")
        return
    entry.killed_after_step = before[-1]["step"] if before else None
    ckpt = latest_checkpoint(out)
    entry.checkpoint_step = int(ckpt.name.split("-")[-1])
    files = checkpoint_files(ckpt)
    entry.checkpoint_files, entry.checkpoint_bytes = files, sum(files.values())
    final = entry.checkpoint_step + r.resume_steps
    second = write_params(_section(recipe, plan, inputs, out, final), root / "resume.yaml")
    log(f"[gpu_smoke] resume: killed after step {entry.killed_after_step}; checkpoint-{entry.checkpoint_step} "
        f"is {entry.checkpoint_bytes / 2**30:.2f} GiB; resuming to step {final} ...")
    tic = time.perf_counter()
    done = subprocess.run(stage_command(second), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=r.timeout_s)
    entry.resume_run_s = time.perf_counter() - tic
    entry.resume_exit = done.returncode
    (root / "resume.log").write_text(done.stdout + done.stderr)
    match = RESUMED.search(done.stdout + done.stderr)
    entry.resumed_at_step = int(match["step"]) if match else None
    # the rerun drops the rows logged after its checkpoint (the killed run's last steps) and appends its own
    kept = [row for row in before if row["step"] <= entry.checkpoint_step]
    after = read_log(out)
    rows = after[len(kept):]
    entry.steps_after_resume = [row["step"] for row in rows]
    entry.final_step = rows[-1]["step"] if rows else None
    same_step = entry.checkpoint_step + 1
    entry.loss_before_kill = next((row["total"] for row in before if row["step"] == same_step), None)
    entry.loss_after_resume = next((row["total"] for row in rows if row["step"] == same_step), None)
    entry.checks = resume_checks(entry, [row["total"] for row in rows], final, out)
    entry.checks["log_before_the_checkpoint_kept"] = after[:len(kept)] == kept
    failed = [name for name, ok in entry.checks.items() if not ok]
    if failed:
        entry.status = "failed"
        entry.reason = f"checks failed: {failed}; {_tail(root / 'resume.log')}"
    log(f"[gpu_smoke] resume: {entry.status}; resumed at step {entry.resumed_at_step}, logged "
        f"{entry.steps_after_resume}")


def resume_checks(entry: ResumeCheck, losses: list[float], final: int, out: Path) -> dict[str, bool]:
    """What a correct kill and resume shows: the first run died of SIGKILL, the rerun exited 0,
    reported resuming at the newest checkpoint, logged exactly the steps after it up to ``final``
    with finite ``losses``, and finished: its pipeline and its ``finished.json`` at ``final`` under
    ``out`` (its checkpoints may be gone: ``delete_checkpoints_when_done``)."""
    marker = out / FINISHED
    finished = json.loads(marker.read_text()).get("steps") if marker.is_file() else None
    return {
        "killed_by_sigkill": entry.first_exit == -signal.SIGKILL,
        "resume_exit_0": entry.resume_exit == 0,
        "resumed_at_newest_checkpoint": entry.resumed_at_step == entry.checkpoint_step,
        "logged_the_steps_after_the_checkpoint": entry.steps_after_resume == list(
            range(entry.checkpoint_step + 1, final + 1)),
        "finite_losses": bool(losses) and all(math.isfinite(v) for v in losses),
        "finished_at_the_final_step": finished == final,
        "pipeline_written": (out / "pipeline" / "model_index.json").is_file(),
    }


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])[-600:]
