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

from ..config import check_device, require

METHODS: tuple[str, ...] = ("reflow", "perflow")


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


@dataclass
class StudentConfig:
    method: str
    windows: int = 1
    ma: bool = False
    ma_weight: float | None = None  # overrides toy2d_train.ma.weight for this student

    def validate(self, where: str) -> None:
        require(self.method in METHODS, f"{where}.method", self.method, f"unknown method; one of {METHODS}")
        require(self.windows >= 1, f"{where}.windows", self.windows, "K must be >= 1")
        if self.method == "reflow":
            require(self.windows == 1, f"{where}.windows", self.windows, "reflow uses K = 1")
        if self.ma_weight is not None:
            require(self.ma_weight >= 0, f"{where}.ma_weight", self.ma_weight, "lambda must be >= 0")

    def inactive_fields(self) -> dict[str, str]:
        return {} if self.ma else {"ma_weight": "this student has ma: false"}


@dataclass
class TrainStageConfig:
    batch_size: int = 512
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    snapshot_every: int = 0
    log_every: int = 50
    model: TimeMLPConfig = field(default_factory=TimeMLPConfig)
    reflow_pairs: ReflowPairConfig = field(default_factory=ReflowPairConfig)
    perflow: PeRFlowConfig = field(default_factory=PeRFlowConfig)
    ma: MAConfig = field(default_factory=MAConfig)
    students: dict[str, StudentConfig] = field(default_factory=dict)

    def train_config(self, seed: int) -> TrainConfig:
        """The library's ``TrainConfig`` for these settings (it validates the optimizer fields)."""
        return TrainConfig(steps=self.steps, lr=self.lr, seed=seed, warmup=self.warmup,
                           checkpoint_every=self.checkpoint_every, snapshot_every=self.snapshot_every,
                           log_every=self.log_every, grad_clip=self.grad_clip)

    def validate(self, where: str) -> None:
        require(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "must be >= 1")
        self.train_config(seed=0)  # raises InvalidParameter, mapped to the key path by from_dict
        require(len(self.students) >= 1, f"{where}.students", self.students, "need at least one student")
        weights = self.ma.window_weights
        if weights is not None:
            for name, student in self.students.items():
                require(not student.ma or len(weights) == student.windows, f"{where}.ma.window_weights",
                        weights, f"needs one weight per window; student {name!r} has K = {student.windows}")

    def inactive_fields(self) -> dict[str, str]:
        students = self.students.values()
        unused = {}
        if not any(s.ma for s in students):
            unused["ma"] = "no student has ma: true"
        for method, key in (("reflow", "reflow_pairs"), ("perflow", "perflow")):
            if not any(s.method == method for s in students):
                unused[key] = f"no student has method: {method}"
        return unused


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
        require(len(self.nfe) >= 1 and all(n >= 1 for n in self.nfe), f"{where}.nfe", self.nfe,
                "steps must be >= 1")
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

__all__ = ["METHODS", "SECTIONS", "EvalConfig", "Fig1Config", "MixtureConfig",
           "StudentConfig", "TVBoundConfig", "Toy2DConfig", "TrainStageConfig",
           "UnderdeterminationConfig"]
