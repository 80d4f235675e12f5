"""The exact 2-D tier's registration: its params sections, its four notebook stages, its checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import require
from ..registry import StageSpec, Tier, section
from .config import SECTIONS
from .sweep import SweepConfig, family_points, narrowed

CHECKPOINTS = "checkpoints/toy2d"
SWEEP_CHECKPOINTS = "checkpoints/toy2d_sweep"
#: the swept families, one DVC stage each (``toy2d_sweep@<family>``, a ``foreach`` in dvc.yaml);
#: ``toy2d_sweep.families`` in params.yaml defines exactly these
SWEEP_FAMILIES: tuple[str, ...] = ("ma_weight", "ma_substeps", "continuous_substeps", "windows",
                                   "teacher_steps", "reflow_ma_weight", "reflow_ma_continuous")
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


def sweep_families_registered(params: dict[str, Any]) -> None:
    """``toy2d_sweep.families`` lists exactly the registered families, each valid for its student."""
    sweep = section(params, "toy2d_sweep")
    require(set(sweep.families) == set(SWEEP_FAMILIES), "toy2d_sweep.families", sorted(sweep.families),
            f"must define exactly the families with a DVC stage: {list(SWEEP_FAMILIES)}")
    train = section(params, "toy2d_train")
    for name, family in sweep.families.items():
        family_points(family, train, f"toy2d_sweep.families.{name}")


@dataclass(frozen=True)
class SweepStage(StageSpec):
    """The stage of one sweep family: its notebook receives ``toy2d_sweep`` with that family only."""

    family: str = ""

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        given = super().validate(params)
        return {**given, "toy2d_sweep": narrowed(given["toy2d_sweep"], self.family)}


TRAIN = ("toy2d", "toy2d_train")
EVAL = (*TRAIN, "toy2d_eval")
TIER = Tier(
    name="toy2d",
    sections={**SECTIONS, "toy2d_sweep": SweepConfig},
    stages=(
        StageSpec("toy2d_train", "notebooks/toy2d_train.py", TRAIN, "results/toy2d/train"),
        StageSpec("fig1_mog", "notebooks/fig1_mog.py", (*EVAL, "fig1_mog"), "results/toy2d/fig1_mog",
                  (students_exist, fig1_nfe_is_evaluated)),
        StageSpec("underdetermination", "notebooks/underdetermination.py",
                  (*EVAL, "underdetermination"), "results/toy2d/underdetermination",
                  (students_exist, snapshots_are_kept)),
        StageSpec("tv_bound", "notebooks/tv_bound.py", (*EVAL, "tv_bound"), "results/toy2d/tv_bound",
                  (students_exist,)),
        *(SweepStage(f"toy2d_sweep@{family}", "notebooks/toy2d_sweep.py", (*EVAL, "toy2d_sweep"),
                     f"results/toy2d/sweep/{family}", (sweep_families_registered,), family=family)
          for family in SWEEP_FAMILIES),
    ),
    persistent_outputs=(CHECKPOINTS, SWEEP_CHECKPOINTS),
)
