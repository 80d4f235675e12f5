"""The stage runner that DVC calls: validate params, then run the stage.

``python -m replication.stage fig1_mog`` looks the stage up in the tier registry and validates every
params section it reads (a bad value stops here, before any work, naming the key and the value),
from the tier's params file (``params.yaml`` for the CPU tiers, ``replication/gpu/params.yaml`` for
the GPU tiers; ``--params`` overrides). A notebook stage converts its jupytext percent-format ``.py``
notebook, executes it with papermill in a temporary folder, scrubs what changes from run to run
(``reproducible.py``) and only on success replaces the stage's results folder with it: a crash never
leaves half-written results. A failed run's notebook is kept in ``results/.failed/<stage>/``
(git-ignored) for debugging. A module stage calls its tier's function with the validated sections
(``accelerate launch -m replication.stage NAME`` runs it in every process). This module imports no
tier.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from marflow_core.atomic import current_umask

from .config import ConfigError, load_params
from .registry import ModuleStage, StageSpec, section, stage, stages, tier_of, validate_all

REPO_ROOT = Path(__file__).resolve().parents[1]


def notebook_from_py(path: Path):
    """A jupytext percent-format ``.py`` file as an nbformat notebook with a python3 kernelspec."""
    import jupytext

    nb = jupytext.read(path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


#: the OpenMP wait policy that lets a waiting thread sleep instead of spinning
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def cpu_times(stat_text: str) -> tuple[int, int]:
    """``(idle, total)`` jiffies of the aggregate ``cpu`` line of ``/proc/stat`` (idle + iowait
    count as idle)."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]]
            return values[3] + (values[4] if len(values) > 4 else 0), sum(values[:8])
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def free_cores(sample_seconds: float = 0.3, stat_path: str = "/proc/stat") -> float | None:
    """Cores left idle by everything else over ``sample_seconds`` (``n_cores * idle fraction``,
    from two reads of ``/proc/stat``), or None where that file does not exist."""
    try:
        idle0, total0 = cpu_times(Path(stat_path).read_text())
        time.sleep(sample_seconds)
        idle1, total1 = cpu_times(Path(stat_path).read_text())
    except (OSError, ValueError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle1 - idle0) / max(total1 - total0, 1)


def thread_environment(threads: int, environ: dict[str, str], free: float | None) -> dict[str, str]:
    """The variables to add to ``environ`` for a stage that runs ``threads`` OpenMP threads, given
    ``free`` idle cores (None: unknown). Nothing the user set is overridden.

    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are ``threads`` always: the thread count is part of a
    result's bit pattern (summation order), so it does not follow the load. The wait policy does
    not change a single bit, so it does: on a machine with fewer free cores than ``threads``,
    spinning OpenMP threads wait for a partner that is descheduled, and the image stages' small
    convolutions run several times slower (``benchmarks/bench_contention.py``); there
    ``OMP_WAIT_POLICY=PASSIVE`` lets them sleep. On a free machine spinning is faster (no wake-up
    per parallel region), so the default stays."""
    env = {var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if var not in environ}
    user_policy = "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ
    if threads > 1 and not user_policy and free is not None and free < threads - 0.5:
        env.update(PASSIVE)
    return env


def set_thread_environment(threads: int) -> dict[str, str]:
    """Apply ``thread_environment`` to ``os.environ`` (which the kernel inherits); returns what it added."""
    free = free_cores() if threads > 1 else None
    added = thread_environment(threads, dict(os.environ), free)
    os.environ.update(added)
    if "OMP_WAIT_POLICY" in added:
        print(f"machine busy ({free:.1f} of {os.cpu_count()} cores free): this stage's {threads} OpenMP "
              f"threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE; results are bit-identical)",
              file=sys.stderr)
    return added


#: the notebook kernel logs only critical messages: its start-up notice about the local TCP
#: transport and its shutdown-time "KeyboardInterrupt caught in kernel" are not the user's business
#: (errors in the notebook still fail the stage through papermill)
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]
#: warnings the kernel's libraries print that say nothing about the run: tqdm.auto's notice that the
#: kernel has no widget front end (progress is shown as text, as intended)
KERNEL_WARNING_FILTERS = ("ignore:IProgress not found",)


def quiet_kernel() -> None:
    """Add ``KERNEL_WARNING_FILTERS`` to the ``PYTHONWARNINGS`` the kernel inherits."""
    current = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join([*current, *(f for f in KERNEL_WARNING_FILTERS
                                                         if f not in current)])


def _execute(spec: StageSpec, params: dict, tmp_dir: Path, root: Path, progress: bool) -> Path:
    import nbformat
    import papermill

    nb_name = Path(spec.notebook).stem
    source = tmp_dir / f"{nb_name}.source.ipynb"
    nbformat.write(notebook_from_py(root / spec.notebook), source)
    executed = tmp_dir / f"{nb_name}.ipynb"
    set_thread_environment(spec.threads)  # the kernel inherits this process's environment
    quiet_kernel()
    papermill.execute_notebook(
        str(source), str(executed), kernel_name="python3", cwd=str(root),
        parameters={"params": params, "out_dir": str(tmp_dir.relative_to(root)), "progress": progress},
        progress_bar=False, log_output=progress, request_save_on_cell_execute=False,
        extra_arguments=KERNEL_ARGUMENTS,
    )
    source.unlink()
    return executed


def _scrub(executed: Path, spec: StageSpec, tmp_dir: Path, root: Path) -> None:
    import nbformat

    from .reproducible import scrub_notebook

    nb = nbformat.read(executed, as_version=4)
    replacements = {str(tmp_dir): spec.out_dir, str(tmp_dir.relative_to(root)): spec.out_dir,
                    str(root) + "/": "", str(root): "."}
    nbformat.write(nbformat.from_dict(scrub_notebook(nb, replacements)), executed)


def validated(name: str, params_path: Path | None, root: Path = REPO_ROOT):
    """``(spec, all_params, params_path)`` of stage ``name`` after validating its params file (the
    tier's own, relative to the working directory, when ``params_path`` is None)."""
    spec = stage(name)
    params_file = tier_of(name).params_file
    params_path = Path(params_file) if params_path is None else params_path
    all_params = load_params(params_path)
    spec.validate(all_params)
    validate_all(all_params, params_file)
    return spec, all_params, params_path


def run_module_stage(spec: ModuleStage, all_params: dict, progress: bool = True):
    """Call a module stage's function with its validated sections; returns its summary."""
    set_thread_environment(spec.threads)
    configs = {name: section(all_params, name) for name in spec.sections}
    return spec.function()(configs, progress)


def run_stage(name: str, params_path: Path | None = None, root: Path = REPO_ROOT,
              progress: bool = True) -> Path:
    """Validate, convert, execute and scrub notebook stage ``name``; returns its results folder."""
    spec, all_params, params_path = validated(name, params_path, root)
    if not isinstance(spec, StageSpec):
        raise TypeError(f"stage {name} is a module stage: use run_module_stage")
    params = spec.validate(all_params)
    out_dir = root / spec.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run of this stage
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp's 0700 would become the results folder's mode
    try:
        reason = spec.skip_reason(all_params)
        if reason is not None:
            from .skipped import write_skipped

            print(f"stage {name} skipped: {reason}", file=sys.stderr)
            write_skipped(name, reason, spec.out_dir, tmp_dir, root)
        else:
            executed = _execute(spec, params, tmp_dir, root, progress)
            _scrub(executed, spec, tmp_dir, root)
    except BaseException:
        failed = root / "results" / ".failed" / name
        shutil.rmtree(failed, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp_dir), failed)
        print(f"stage {name} failed; its partial notebook is in {failed}", file=sys.stderr)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", help="a stage name (`--list` shows them)")
    parser.add_argument("--params", default=None, type=Path,
                        help="params file (default: the stage's tier's, e.g. params.yaml)")
    parser.add_argument("--check-only", action="store_true", help="validate params and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--list", action="store_true", help="list the stages of every tier")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(describe(s) for s in stages().values()))
        return 0
    if args.stage is None:
        parser.error("name a stage, or use --list")
    try:
        tic = time.perf_counter()
        spec, all_params, params_path = validated(args.stage, args.params)
        if args.check_only:
            print(f"{params_path}: parameters of stage {args.stage} are valid")
            reason = spec.skip_reason(all_params) if isinstance(spec, StageSpec) else None
            if reason is not None:
                print(f"stage {args.stage} will be skipped: {reason}")
            return 0
        if isinstance(spec, ModuleStage):
            summary = run_module_stage(spec, all_params, progress=not args.quiet)
            print(f"stage {args.stage}: {json.dumps(summary, default=str)} "
                  f"({time.perf_counter() - tic:.0f} s)")
            return 0
        out = run_stage(args.stage, args.params, progress=not args.quiet)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"stage {args.stage}: results in {out.relative_to(REPO_ROOT)} "
          f"({time.perf_counter() - tic:.0f} s)")
    return 0


def describe(spec) -> str:
    """One ``--list`` line: name, tier and params file, what runs."""
    tier = tier_of(spec.name)
    what = f"{spec.notebook} -> {spec.out_dir}" if isinstance(spec, StageSpec) else spec.entry
    return f"{spec.name} [{tier.name}, {tier.params_file}]: {what}"


if __name__ == "__main__":
    sys.exit(main())
