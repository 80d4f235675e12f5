"""The exact 2-D tier's registration: its params sections, its four notebook stages, its checks."""

from __future__ import annotations

from typing import Any

from ..config import require
from ..registry import StageSpec, Tier, section
from .config import SECTIONS

CHECKPOINTS = "checkpoints/toy2d"
EVALUATION_STAGES: tuple[str, ...] = ("fig1_mog", "underdetermination", "tv_bound")


def students_exist(params: dict[str, Any]) -> None:
    """Every student an evaluation stage names is trained by ``toy2d_train``."""
    train = section(params, "toy2d_train")
    for name in EVALUATION_STAGES:
        if name in params:
            for i, student in enumerate(section(params, name).students):
                require(student in train.students, f"{name}.students[{i}]", student,
                        f"no such student in toy2d_train.students ({sorted(train.students)})")


def fig1_nfe_is_evaluated(params: dict[str, Any]) -> None:
    nfe_show = section(params, "fig1_mog").nfe_show
    nfe = section(params, "toy2d_eval").nfe
    require(nfe_show in nfe, "fig1_mog.nfe_show", nfe_show, f"must be one of toy2d_eval.nfe {nfe}")


def snapshots_are_kept(params: dict[str, Any]) -> None:
    train = section(params, "toy2d_train")
    require(0 < train.snapshot_every <= train.steps, "toy2d_train.snapshot_every",
            train.snapshot_every, "the underdetermination stage needs snapshots: 1..steps")


TRAIN = ("toy2d", "toy2d_train")
EVAL = (*TRAIN, "toy2d_eval")
TIER = Tier(
    name="toy2d",
    sections=SECTIONS,
    stages=(
        StageSpec("toy2d_train", "notebooks/toy2d_train.py", TRAIN, "results/toy2d/train"),
        StageSpec("fig1_mog", "notebooks/fig1_mog.py", (*EVAL, "fig1_mog"), "results/toy2d/fig1_mog",
                  (students_exist, fig1_nfe_is_evaluated)),
        StageSpec("underdetermination", "notebooks/underdetermination.py",
                  (*EVAL, "underdetermination"), "results/toy2d/underdetermination",
                  (students_exist, snapshots_are_kept)),
        StageSpec("tv_bound", "notebooks/tv_bound.py", (*EVAL, "tv_bound"), "results/toy2d/tv_bound",
                  (students_exist,)),
    ),
    persistent_outputs=(CHECKPOINTS,),
)
