"""Dataclasses for the 2-D tier's ``params.yaml`` sections (``toy2d``, ``toy2d_train``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from marflow_core.errors import InvalidParameter
from marflow_core.marginal import MAConfig
from marflow_core.perflow import WINDOW_STARTS
from marflow_core.solvers import FIXED_METHODS
from marflow_core.training import TrainConfig

from ..config import fail, from_dict, require

METHODS: tuple[str, ...] = ("reflow", "perflow")


@dataclass
class MixtureConfig:
    """``x1 ~ sum_i weights_i N(means_i, stds_i^2 I)``."""

    weights: list[float]
    means: list[list[float]]
    stds: list[float]

    def validate(self, where: str) -> None:
        n = len(self.weights)
        require(n >= 1, f"{where}.weights", self.weights, "need at least one component")
        require(len(self.means) == n, f"{where}.means", self.means, f"need {n} means")
        require(len(self.stds) == n, f"{where}.stds", self.stds, f"need {n} stds")
        require(all(w > 0 for w in self.weights), f"{where}.weights", self.weights, "must be > 0")
        require(all(s > 0 for s in self.stds), f"{where}.stds", self.stds, "must be > 0")
        require(all(len(m) == 2 for m in self.means), f"{where}.means", self.means, "must be 2-D points")


@dataclass
class Toy2DConfig:
    seed: int = 0
    device: str = "cpu"
    mixture: MixtureConfig = field(default_factory=lambda: MixtureConfig([1.0], [[0.0, 0.0]], [1.0]))

    def validate(self, where: str) -> None:
        require(self.device == "cpu" or self.device.startswith("cuda"), f"{where}.device", self.device,
                "must be 'cpu' or 'cuda[:n]'")


@dataclass
class ModelConfig:
    hidden: int = 128
    depth: int = 3
    time_dim: int = 32

    def validate(self, where: str) -> None:
        for key in ("hidden", "depth", "time_dim"):
            value = getattr(self, key)
            require(value >= 1, f"{where}.{key}", value, "must be >= 1")
        require(self.time_dim % 2 == 0, f"{where}.time_dim", self.time_dim, "must be even")


@dataclass
class ReflowPairsConfig:
    n_pairs: int = 20000
    shard_size: int = 5000
    steps: int = 32
    solver: str = "rk4"

    def validate(self, where: str) -> None:
        for key in ("n_pairs", "shard_size", "steps"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")
        require(self.solver in FIXED_METHODS, f"{where}.solver", self.solver, f"one of {FIXED_METHODS}")


@dataclass
class PeRFlowConfig:
    teacher_steps: int = 4
    solver: str = "rk4"
    start: str = "noised_data"

    def validate(self, where: str) -> None:
        require(self.teacher_steps >= 1, f"{where}.teacher_steps", self.teacher_steps, "must be >= 1")
        require(self.solver in FIXED_METHODS, f"{where}.solver", self.solver, f"one of {FIXED_METHODS}")
        require(self.start in WINDOW_STARTS, f"{where}.start", self.start, f"one of {WINDOW_STARTS}")


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
    model: ModelConfig = field(default_factory=ModelConfig)
    reflow_pairs: ReflowPairsConfig = field(default_factory=ReflowPairsConfig)
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
        try:
            self.train_config(seed=0)
        except InvalidParameter as err:
            fail(f"{where}.{err.key}", err.value, err.why)
        require(len(self.students) >= 1, f"{where}.students", self.students, "need at least one student")
        weights = self.ma.window_weights
        if weights is not None:
            for name, student in self.students.items():
                require(not student.ma or len(weights) == student.windows, f"{where}.ma.window_weights",
                        weights, f"needs one weight per window; student {name!r} has K = {student.windows}")


@dataclass
class EvalConfig:
    """Shared by the evaluation notebooks."""

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
        for key in ("sw_projections", "mmd_samples", "tm_eval_batch", "teacher_steps"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")


@dataclass
class Fig1Config:
    nfe_show: int = 4
    n_show: int = 4000
    n_trajectories: int = 150
    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        require(self.nfe_show >= 1, f"{where}.nfe_show", self.nfe_show, "must be >= 1")
        require(self.n_show >= 1, f"{where}.n_show", self.n_show, "must be >= 1")
        require(self.n_trajectories >= 0, f"{where}.n_trajectories", self.n_trajectories, "must be >= 0")


@dataclass
class UnderdeterminationConfig:
    rotation_degrees: float = 30.0
    n_samples: int = 20000
    teacher_steps: int = 64
    nfe: int = 4
    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        require(0 < abs(self.rotation_degrees) < 360, f"{where}.rotation_degrees", self.rotation_degrees,
                "must be a non-zero angle in (-360, 360)")
        for key in ("n_samples", "teacher_steps", "nfe"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")


@dataclass
class TVBoundConfig:
    steps_per_window: int = 1
    ode_substeps: int = 16  # RK4 steps per window of the MA value estimator (A)
    ode_euler_steps: int = 64  # Euler steps per window of the fine "student ODE" map
    n_samples: int = 20000
    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])

    def validate(self, where: str) -> None:
        for key in ("steps_per_window", "ode_substeps", "ode_euler_steps", "n_samples"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")


SECTIONS: dict[str, type] = {
    "toy2d": Toy2DConfig,
    "toy2d_train": TrainStageConfig,
    "toy2d_eval": EvalConfig,
    "fig1_mog": Fig1Config,
    "underdetermination": UnderdeterminationConfig,
    "tv_bound": TVBoundConfig,
}


def section(params: dict[str, Any], name: str):
    """Validated dataclass of section ``name`` of a params dict."""
    return from_dict(SECTIONS[name], params.get(name, {}), name)


def check_students_exist(names: list[str], train: TrainStageConfig, where: str) -> None:
    for i, name in enumerate(names):
        require(name in train.students, f"{where}[{i}]", name,
                f"no such student in toy2d_train.students ({sorted(train.students)})")
