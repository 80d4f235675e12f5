"""The CIFAR-10 tier's parameters: one dataclass per section, loaded with ``replication.config.from_dict``.

The paper-scale values (``gpu.yaml`` next to this file) follow the rectified-flow CIFAR-10 protocol
where it is known: 50,000-sample FID against the training set at 1, 2 and 4 NFE, compared with the
numbers in ``replication/references/peers.yaml``. The teacher is a diffusers ``UNet2DModel``
(DDPM's CIFAR-10 layout, ~36M parameters), not the NCSN++ of Liu et al., so its numbers are
comparable in protocol, not in architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from marflow_core import MAConfig
from marflow_core.solvers import FIXED_METHODS

from ..config import from_dict, require

METHODS: tuple[str, ...] = ("reflow", "perflow")


@dataclass
class DataConfig:
    """``root`` holds ``cifar-10-batches-py/``; the first ``n_train`` training images are used."""

    root: str = "data/cifar10"
    n_train: int = 50000
    hflip: bool = True

    def validate(self, where: str) -> None:
        require(1 <= self.n_train <= 50000, f"{where}.n_train", self.n_train, "1..50000 images")


@dataclass
class UNetConfig:
    """A diffusers ``UNet2DModel`` on 32x32x3; ``attention[i]`` puts attention in level ``i``."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 256])
    attention: list[bool] = field(default_factory=lambda: [False, True, False, False])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    dropout: float = 0.1
    time_scale: float = 999.0

    def validate(self, where: str) -> None:
        require(len(self.attention) == len(self.block_out_channels), f"{where}.attention",
                self.attention, f"one flag per level ({len(self.block_out_channels)})")
        require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
                f"{where}.block_out_channels", self.block_out_channels,
                f"each must be divisible by norm_num_groups={self.norm_num_groups}")
        require(self.layers_per_block >= 1, f"{where}.layers_per_block", self.layers_per_block, ">= 1")
        require(0 <= self.dropout < 1, f"{where}.dropout", self.dropout, "in [0, 1)")
        require(self.time_scale > 0, f"{where}.time_scale", self.time_scale, "> 0")


@dataclass
class OptimConfig:
    """``steps`` Adam steps of ``batch_size`` at ``lr`` (warm-up, clipping, checkpoints)."""

    steps: int = 200000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    checkpoint_every: int = 5000
    log_every: int = 100

    def validate(self, where: str) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), ">= 1")
        require(self.lr > 0, f"{where}.lr", self.lr, "> 0")
        require(self.warmup >= 0, f"{where}.warmup", self.warmup, ">= 0")


@dataclass
class PairsConfig:
    """Reflow pairs ``(x0, Phi^T(x0))``: ``n_pairs`` in shards, ``steps`` of ``solver``."""

    n_pairs: int = 200000
    shard_size: int = 10000
    steps: int = 32
    solver: str = "rk4"
    batch_size: int = 1000

    def validate(self, where: str) -> None:
        for key in ("n_pairs", "shard_size", "steps", "batch_size"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), ">= 1")
        require(self.solver in FIXED_METHODS, f"{where}.solver", self.solver, f"one of {FIXED_METHODS}")


@dataclass
class StudentConfig:
    """One student: ``reflow`` (pairs, ``windows = 1``) or ``perflow`` (``windows`` K, teacher solve of
    ``teacher_steps`` M steps from noised data); ``ma_weight`` > 0 adds the MA term."""

    method: str = "perflow"
    windows: int = 4
    teacher_steps: int = 8
    teacher_solver: str = "euler"
    ma_weight: float = 0.0

    def validate(self, where: str) -> None:
        require(self.method in METHODS, f"{where}.method", self.method, f"one of {METHODS}")
        require(self.windows >= 1, f"{where}.windows", self.windows, ">= 1")
        require(self.method == "perflow" or self.windows == 1, f"{where}.windows", self.windows,
                "reflow has one window")
        require(self.teacher_steps >= 1, f"{where}.teacher_steps", self.teacher_steps, ">= 1")
        require(self.teacher_solver in FIXED_METHODS, f"{where}.teacher_solver", self.teacher_solver,
                f"one of {FIXED_METHODS}")
        require(self.ma_weight >= 0, f"{where}.ma_weight", self.ma_weight, ">= 0")


@dataclass
class FIDConfig:
    """FID of ``n_samples`` samples per model and NFE against the first ``n_reference`` training images.

    ``feature_extractor`` is a torch-fidelity extractor name; on a machine without network pass the
    local Inception weights file (``pt_inception-2015-12-05-6726825d.pth``) as
    ``feature_extractor_weights_path``. ``teacher_nfe``: Euler NFEs of the teacher for reference. ``save_cpu_ram``: torch-fidelity
    reads images in the main process (no loader workers; for small CPU runs).
    """

    n_samples: int = 50000
    n_reference: int = 50000
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_nfe: list[int] = field(default_factory=lambda: [100])
    batch_size: int = 500
    feature_extractor: str = "inception-v3-compat"
    feature_extractor_weights_path: str | None = None
    grid_images: int = 64
    save_cpu_ram: bool = False

    def validate(self, where: str) -> None:
        for key in ("n_samples", "n_reference", "batch_size"):
            require(getattr(self, key) >= 2, f"{where}.{key}", getattr(self, key), ">= 2")
        require(self.n_reference <= 50000, f"{where}.n_reference", self.n_reference, "<= 50000")
        require(all(n >= 1 for n in self.nfe + self.teacher_nfe), f"{where}.nfe", self.nfe, "each >= 1")
        require(self.grid_images >= 0, f"{where}.grid_images", self.grid_images, ">= 0")


@dataclass
class Cifar10Config:
    """The whole tier. ``ma`` holds the MA settings shared by every student with ``ma_weight`` > 0
    (its own ``weight`` is replaced by the student's); ``t_max`` is the teacher-score cutoff."""

    seed: int = 0
    device: str = "cuda"
    checkpoint_dir: str = "checkpoints/cifar10"
    out_dir: str = "results/cifar10"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    teacher: OptimConfig = field(default_factory=OptimConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    student_optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=50000, lr=5e-5, warmup=0))
    students: dict[str, StudentConfig] = field(default_factory=dict)
    ma: MAConfig = field(default_factory=lambda: MAConfig(weight=0.1, substeps=1, divergence="hutchinson_fd",
                                                          n_probes=1))
    t_max: float = 0.99
    fid: FIDConfig = field(default_factory=FIDConfig)

    def validate(self, where: str) -> None:
        require(self.device == "cpu" or self.device.startswith("cuda"), f"{where}.device", self.device,
                "'cpu' or 'cuda[:N]'")
        require(bool(self.students), f"{where}.students", self.students, "at least one student")
        require(0 < self.t_max < 1, f"{where}.t_max", self.t_max, "in (0, 1)")
        for name in self.students:
            require(name != "teacher" and name.isidentifier(), f"{where}.students.{name}", name,
                    "a Python identifier other than 'teacher'")


def load_config(path: str | Path) -> Cifar10Config:
    """The tier's config from a YAML file whose top level is the ``Cifar10Config`` mapping."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    return from_dict(Cifar10Config, data, "cifar10")
