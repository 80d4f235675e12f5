"""The exact 2-D tier's registration: its params sections, its four notebook stages, its checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import require
from ..registry import StageSpec, Tier, section
from .ablation import AblationConfig
from .config import SECTIONS
from .related import RelatedConfig
from .selection import TestConfig
from .sweep import SweepConfig, family_points, narrowed

CHECKPOINTS = "checkpoints/toy2d"
SWEEP_CHECKPOINTS = "checkpoints/toy2d_sweep"
TEST_CHECKPOINTS = "checkpoints/toy2d_test"
ABLATION_CHECKPOINTS = "checkpoints/toy2d_ablation"
RELATED_CHECKPOINTS = "checkpoints/toy2d_related"
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


def selections_are_sweeps(params: dict[str, Any]) -> None:
    """Each tuned student of ``toy2d_test`` is the student its family sweeps, at a swept NFE, and
    every compared student is trained."""
    sweep, test = section(params, "toy2d_sweep"), section(params, "toy2d_test")
    students = section(params, "toy2d_train").students
    for student, rule in test.select.items():
        where = f"toy2d_test.select.{student}"
        require(student in students, where, student, f"no such student in toy2d_train.students ({sorted(students)})")
        require(rule.family in sweep.families, f"{where}.family", rule.family,
                f"no such sweep family ({sorted(sweep.families)})")
        require(sweep.families[rule.family].student == student, f"{where}.family", rule.family,
                f"sweeps {sweep.families[rule.family].student}, not {student}")
        require(rule.nfe in sweep.nfe, f"{where}.nfe", rule.nfe, f"not a swept NFE ({sweep.nfe})")
    for i, pair in enumerate(test.compare):
        for name in pair:
            require(name in students, f"toy2d_test.compare[{i}]", pair,
                    f"{name!r} is not in toy2d_train.students ({sorted(students)})")


def ablation_variants_valid(params: dict[str, Any]) -> None:
    """Every variant's student is trained, and its overrides are values the library accepts."""
    from .ablation import variant_students

    ablation, sweep = section(params, "toy2d_ablation"), section(params, "toy2d_sweep")
    require(ablation.n_seeds <= len(sweep.test_seeds), "toy2d_ablation.n_seeds", ablation.n_seeds,
            f"the ablation runs on the first n_seeds of toy2d_sweep.test_seeds ({sweep.test_seeds})")
    train = section(params, "toy2d_train")
    variant_students(ablation, {name: (train, student) for name, student in train.students.items()})


def related_seeds_are_test_seeds(params: dict[str, Any]) -> None:
    """The related methods run on the first ``n_seeds`` test seeds, beside the test table's students."""
    related, sweep = section(params, "toy2d_related"), section(params, "toy2d_sweep")
    require(related.n_seeds <= len(sweep.test_seeds), "toy2d_related.n_seeds", related.n_seeds,
            f"the related methods run on the first n_seeds of toy2d_sweep.test_seeds ({sweep.test_seeds})")
    train = section(params, "toy2d_train")
    for i, name in enumerate(related.reference_students):
        require(name in train.students, f"toy2d_related.reference_students[{i}]", name,
                f"no such student in toy2d_train.students ({sorted(train.students)})")


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
    sections={**SECTIONS, "toy2d_sweep": SweepConfig, "toy2d_test": TestConfig,
              "toy2d_ablation": AblationConfig, "toy2d_related": RelatedConfig},
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
        StageSpec("toy2d_test", "notebooks/toy2d_test.py", (*EVAL, "toy2d_sweep", "toy2d_test"),
                  "results/toy2d/test", (sweep_families_registered, selections_are_sweeps)),
        StageSpec("toy2d_sensitivity", "notebooks/toy2d_sensitivity.py", ("toy2d_sweep",),
                  "results/toy2d/sensitivity"),
        StageSpec("toy2d_ablation", "notebooks/toy2d_ablation.py", (*EVAL, "toy2d_sweep", "toy2d_ablation"),
                  "results/toy2d/ablation", (ablation_variants_valid,)),
        StageSpec("toy2d_related", "notebooks/toy2d_related.py",
                  (*EVAL, "toy2d_sweep", "toy2d_test", "toy2d_related"),
                  "results/toy2d/related", (related_seeds_are_test_seeds,)),
    ),
    persistent_outputs=(CHECKPOINTS, SWEEP_CHECKPOINTS, TEST_CHECKPOINTS, ABLATION_CHECKPOINTS, RELATED_CHECKPOINTS),
)
