"""The stage runner that DVC calls: validate params, convert the notebook, execute it with papermill.

``python -m replication.stage fig1_mog`` validates every params section the stage reads (a bad value
stops here, before any work, naming the key and the value), converts ``notebooks/fig1_mog.py``
(jupytext percent format) to a notebook, executes it with papermill into a temporary folder, and only
on success replaces ``results/<tier>/<stage>/`` with it: a crash never leaves half-written results.
A failed run's notebook is kept in ``results/.failed/<stage>/`` (git-ignored) for debugging.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, load_params, require
from .toy2d import config as toy_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]


def _toy2d_cross_checks(params: dict[str, Any]) -> None:
    """Checks that span sections: named students exist, and each stage gets what it will use."""
    train = toy_cfg.section(params, "toy2d_train")
    for name in ("fig1_mog", "underdetermination", "tv_bound"):
        if name in params:
            cfg = toy_cfg.section(params, name)
            toy_cfg.check_students_exist(cfg.students, train, f"{name}.students")
    if "fig1_mog" in params:
        nfe_show = toy_cfg.section(params, "fig1_mog").nfe_show
        nfe = toy_cfg.section(params, "toy2d_eval").nfe
        require(nfe_show in nfe, "fig1_mog.nfe_show", nfe_show, f"must be one of toy2d_eval.nfe {nfe}")
    if "underdetermination" in params:
        require(0 < train.snapshot_every <= train.steps, "toy2d_train.snapshot_every",
                train.snapshot_every, "the underdetermination stage needs snapshots: 1..steps")


@dataclass
class StageSpec:
    """A notebook stage: its notebook, the params sections it reads, and its results folder."""

    notebook: str
    sections: list[str]
    out_dir: str
    extra_checks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """The stage's sections, each validated; raises ``ConfigError``."""
        for name in self.sections:
            toy_cfg.section(params, name)
        for check in self.extra_checks:
            check(params)
        return {name: params.get(name, {}) for name in self.sections}


TOY = ["toy2d", "toy2d_train"]
STAGES: dict[str, StageSpec] = {
    "toy2d_train": StageSpec("notebooks/toy2d_train.py", TOY, "results/toy2d/train"),
    "fig1_mog": StageSpec("notebooks/fig1_mog.py", [*TOY, "toy2d_eval", "fig1_mog"],
                          "results/toy2d/fig1_mog", [_toy2d_cross_checks]),
    "underdetermination": StageSpec("notebooks/underdetermination.py",
                                    [*TOY, "toy2d_eval", "underdetermination"],
                                    "results/toy2d/underdetermination", [_toy2d_cross_checks]),
    "tv_bound": StageSpec("notebooks/tv_bound.py", [*TOY, "toy2d_eval", "tv_bound"],
                          "results/toy2d/tv_bound", [_toy2d_cross_checks]),
}


def notebook_from_py(path: Path):
    """A jupytext percent-format ``.py`` file as an nbformat notebook with a python3 kernelspec."""
    import jupytext

    nb = jupytext.read(path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def run_stage(name: str, params_path: Path, root: Path = REPO_ROOT, progress: bool = True) -> Path:
    """Validate, convert and execute stage ``name``; returns the results folder."""
    import nbformat
    import papermill

    if name not in STAGES:
        raise ConfigError(f"stage = {name!r}: unknown stage; known stages: {sorted(STAGES)}")
    spec = STAGES[name]
    params = spec.validate(load_params(params_path))
    out_dir = root / spec.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    nb_name = Path(spec.notebook).stem
    source = tmp_dir / f"{nb_name}.source.ipynb"
    nbformat.write(notebook_from_py(root / spec.notebook), source)
    executed = tmp_dir / f"{nb_name}.ipynb"
    try:
        papermill.execute_notebook(
            str(source), str(executed), kernel_name="python3", cwd=str(root),
            parameters={"params": params, "out_dir": str(tmp_dir.relative_to(root)),
                        "progress": progress},
            progress_bar=False, log_output=progress, request_save_on_cell_execute=False,
        )
    except BaseException:
        failed = root / "results" / ".failed" / name
        shutil.rmtree(failed, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp_dir), failed)
        print(f"stage {name} failed; its partial notebook is in {failed}", file=sys.stderr)
        raise
    source.unlink()
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help=f"one of {sorted(STAGES)}")
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--check-only", action="store_true", help="validate params and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        if args.check_only:
            if args.stage not in STAGES:
                raise ConfigError(f"stage = {args.stage!r}: unknown stage; known: {sorted(STAGES)}")
            STAGES[args.stage].validate(load_params(args.params))
            print(f"{args.params}: parameters of stage {args.stage} are valid")
            return 0
        out = run_stage(args.stage, args.params, progress=not args.quiet)
    except ConfigError as err:
        print(f"{args.params}: invalid parameter: {err}", file=sys.stderr)
        return 2
    print(f"stage {args.stage}: results in {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
