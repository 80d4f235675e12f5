"""Dataclasses for the 2-D tier's ``params.yaml`` sections (``toy2d``, ``toy2d_train``, ...).

Library settings are the library's own dataclasses (``TimeMLPConfig``, ``ReflowPairConfig``,
``PeRFlowConfig``, ``MAConfig``), which validate themselves; the classes here add only what the tier
itself decides (which students, which evaluation) and the checks that span several fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from marflow_core import (
    GaussianMixtureTeacher,
    MAConfig,
    PeRFlowConfig,
    ReflowPairConfig,
    TimeMLPConfig,
    TrainConfig,
)

from ..common.students import StudentSpec, check_window_weights, unused_pairing_sections
from ..config import check_device, check_name_list, check_nfe_list, require


@dataclass
class MixtureConfig:
    """``x1 ~ sum_i weights_i N(means_i, stds_i^2 I)`` in 2-D."""

    weights: list[float]
    means: list[list[float]]
    stds: list[float]

    def validate(self, where: str) -> None:
        GaussianMixtureTeacher(self.weights, self.means, self.stds, dtype=torch.float64)
        require(all(len(m) == 2 for m in self.means), f"{where}.means", self.means, "must be 2-D points")


@dataclass
class Toy2DConfig:
    seed: int = 0
    device: str = "cpu"
    mixture: MixtureConfig = field(default_factory=lambda: MixtureConfig([1.0], [[0.0, 0.0]], [1.0]))

    def validate(self, where: str) -> None:
        check_device(self.device, f"{where}.device")


#: the config section of each pairing (``replication.common.methods``): teacher pairs come from the
#: pair bank of ``reflow_pairs``, windows are solved online with ``perflow``
PAIRING_SECTIONS: dict[str, str] = {"teacher_pairs": "reflow_pairs", "windows": "perflow"}


@dataclass
class TrainStageConfig(TrainConfig):
    """The students' training: the optimizer fields of ``TrainConfig`` plus the model, the pairing
    sections, the shared MA settings and the students (one seed each: the evaluation notebooks read
    one run per student)."""

    model: TimeMLPConfig = field(default_factory=TimeMLPConfig)
    reflow_pairs: ReflowPairConfig = field(default_factory=ReflowPairConfig)
    perflow: PeRFlowConfig = field(default_factory=PeRFlowConfig)
    ma: MAConfig = field(default_factory=MAConfig)
    students: dict[str, StudentSpec] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(len(self.students) >= 1, f"{where}.students", self.students, "need at least one student")
        for name, student in self.students.items():
            require(len(student.seeds) == 1, f"{where}.students.{name}.seeds", student.seeds,
                    "the 2-D tier trains one seed per student (its notebooks read one run each)")
        check_window_weights(self.students, self.ma, where)

    def inactive_fields(self) -> dict[str, str]:
        return unused_pairing_sections(self.students, PAIRING_SECTIONS)


def _positive(obj, where: str, keys: tuple[str, ...], minimum: int = 1) -> None:
    for key in keys:
        require(getattr(obj, key) >= minimum, f"{where}.{key}", getattr(obj, key), f"must be >= {minimum}")


@dataclass
class EvalConfig:
    """Shared by the evaluation notebooks; ``seed`` is the root of every evaluation stream."""

    n_samples: int = 20000
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seed: int = 1234
    sw_projections: int = 256
    mmd_samples: int = 2000
    tm_eval_batch: int = 8192
    teacher_steps: int = 64

    def validate(self, where: str) -> None:
        require(self.n_samples >= 2, f"{where}.n_samples", self.n_samples, "must be >= 2")
        check_nfe_list(self.nfe, f"{where}.nfe")
        _positive(self, where, ("sw_projections", "tm_eval_batch", "teacher_steps"))
        _positive(self, where, ("mmd_samples",), minimum=2)
        require(self.mmd_samples <= self.n_samples, f"{where}.mmd_samples", self.mmd_samples,
                f"the MMD uses a subset of the {self.n_samples} samples: must be <= n_samples")


@dataclass
class Fig1Config:
    nfe_show: int = 4
    n_show: int = 4000
    n_trajectories: int = 150
    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        check_name_list(self.students, f"{where}.students")
        _positive(self, where, ("nfe_show", "n_show"))
        _positive(self, where, ("n_trajectories",), minimum=0)
        require(self.n_trajectories <= self.n_show, f"{where}.n_trajectories", self.n_trajectories,
                f"trajectories are drawn from the {self.n_show} shown samples: must be <= n_show")


@dataclass
class UnderdeterminationConfig:
    """``tm_equal_within_se``: two snapshots count as having the same TM loss when their paired
    difference (both scored on one batch) is within this many paired standard errors."""

    rotation_degrees: float = 30.0
    n_samples: int = 20000
    teacher_steps: int = 64
    nfe: int = 4
    tm_equal_within_se: float = 2.0
    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        check_name_list(self.students, f"{where}.students")
        require(0 < abs(self.rotation_degrees) < 360, f"{where}.rotation_degrees", self.rotation_degrees,
                "must be a non-zero angle in (-360, 360)")
        require(self.tm_equal_within_se > 0, f"{where}.tm_equal_within_se", self.tm_equal_within_se,
                "must be > 0")
        _positive(self, where, ("n_samples", "teacher_steps", "nfe"))


@dataclass
class TVBoundConfig:
    steps_per_window: int = 1
    ode_substeps: int = 16  # RK4 steps per window of the MA value estimator (A)
    ode_euler_steps: int = 64  # Euler steps per window of the fine "student ODE" map
    n_samples: int = 20000
    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        check_name_list(self.students, f"{where}.students")
        _positive(self, where, ("steps_per_window", "ode_substeps", "ode_euler_steps"))
        _positive(self, where, ("n_samples",), minimum=2)


SECTIONS: dict[str, type] = {
    "toy2d": Toy2DConfig,
    "toy2d_train": TrainStageConfig,
    "toy2d_eval": EvalConfig,
    "fig1_mog": Fig1Config,
    "underdetermination": UnderdeterminationConfig,
    "tv_bound": TVBoundConfig,
}

__all__ = ["PAIRING_SECTIONS", "SECTIONS", "EvalConfig", "Fig1Config", "MixtureConfig",
           "TVBoundConfig", "Toy2DConfig", "TrainStageConfig", "UnderdeterminationConfig"]
