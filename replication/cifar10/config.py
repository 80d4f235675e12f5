"""The CIFAR-10 tier's params sections (in ``replication/gpu/params.yaml``), one dataclass each.

``cifar10`` (seed, device, paths, data, UNet), ``cifar10_teacher`` (its flow-matching training),
``cifar10_pairs`` (the reflow pair bank), ``cifar10_students`` (the students' training, their
PeRFlow window solve and MA settings) and ``cifar10_fid``. Library settings are the library's own
dataclasses (``UNetConfig``, ``TrainConfig``, ``ReflowPairConfig``, ``PeRFlowConfig``, ``MAConfig``),
which validate themselves; students are the shared ``StudentSpec``.

The paper-scale values follow the rectified-flow CIFAR-10 protocol where it is known: 50,000-sample
FID against the training set at 1, 2 and 4 NFE, compared with the numbers in
``replication/references/peers.yaml``. The teacher is a diffusers ``UNet2DModel`` in DDPM's CIFAR-10
layout (~36M parameters), not the NCSN++ of Liu et al., so its numbers are comparable in protocol,
not in architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from marflow_core import InvalidParameter, MAConfig, PeRFlowConfig, ReflowPairConfig, TrainConfig
from marflow_core.unet import UNetConfig

from ..common.students import StudentSpec, check_window_weights, unused_pairing_sections
from ..config import check_device, check_nfe_list, require, require_each
from ..gpu_common.accelerate_train import PRECISIONS

SIZE, CHANNELS = 32, 3
OUTPUTS = "replication/gpu/outputs/cifar10"
CHECKPOINTS = f"{OUTPUTS}/checkpoints"

#: the config of each pairing (``replication.common.methods``): teacher pairs are the bank of the
#: ``cifar10_pairs`` section (its own stage), windows are solved online with ``cifar10_students.perflow``
PAIRING_SECTIONS: dict[str, str] = {"teacher_pairs": "cifar10_pairs", "windows": "perflow"}


def ddpm_unet() -> UNetConfig:
    """DDPM's CIFAR-10 UNet (Ho et al., 2020): 128-256-256-256, single-head attention at 16x16,
    two ResNet blocks per level, dropout 0.1."""
    return UNetConfig(widths=[128, 256, 256, 256], attention_levels=[1], layers_per_block=2,
                      norm_groups=32, attention_head_dim=None, dropout=0.1)


@dataclass
class DataConfig:
    """``root`` holds ``cifar-10-batches-py/``; the first ``n_train`` training images are used, each
    flipped horizontally with probability 1/2 when ``hflip``."""

    root: str = "replication/gpu/inputs/cifar10"
    n_train: int = 50000
    hflip: bool = True

    def validate(self, where: str) -> None:
        require(1 <= self.n_train <= 50000, f"{where}.n_train", self.n_train, "1..50000 images")


@dataclass
class Cifar10Config:
    """Section ``cifar10``, read by every stage. ``seed`` seeds the teacher's run, the pair bank and
    the FID noise (each student has its own ``seeds``); ``device`` must exist on this machine;
    checkpoints, the pair bank and the FID feature cache go under ``checkpoint_dir``, ``fid.json``
    and the sample grids under ``out_dir``. ``model`` is the UNet of the teacher and, with
    ``cifar10_students.dropout``, of the students."""

    seed: int = 0
    device: str = "cuda"
    checkpoint_dir: str = CHECKPOINTS
    out_dir: str = f"{OUTPUTS}/results"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=ddpm_unet)

    def validate(self, where: str) -> None:
        check_device(self.device, f"{where}.device")
        try:
            self.model.check_size(SIZE)
        except InvalidParameter as err:
            require(False, f"{where}.model.{err.key}", err.value, err.why)


# ---------------------------------------------------------------------------------------------------
# The accelerate trainer's keys of the two training sections (replication/gpu_common/accelerate_train.py)
# ---------------------------------------------------------------------------------------------------
#: Rectified Flow's EMA decays on CIFAR-10 (gnobitab/RectifiedFlow, ImageGeneration/configs/
#: rectified_flow/): ``model.ema_rate = 0.999999`` for the 1-rectified flow
#: (``cifar10_rf_gaussian_ddpmpp.py``) and ``0.9999`` for reflow (``cifar10_rf_gaussian_reflow_train.py``,
#: also its distillation configs), both with the warm-up ``min(decay, (1 + n) / (10 + n))`` of its
#: ``models/ema.py`` (``replication/gpu_common/ema.py``).
TEACHER_EMA_DECAY = 0.999999
STUDENT_EMA_DECAY = 0.9999


@dataclass
class AccelerateKeys:
    """How a CIFAR-10 training section runs on accelerate (``accelerate launch`` spreads it over
    processes). ``batch_size`` (the ``TrainConfig`` key) is the *global* batch of one optimizer step,
    split evenly over ``processes x grad_accum`` micro-batches (it must divide), so the same params
    give the same computation on any number of GPUs. ``mixed_precision``: ``no`` (float32, Rectified
    Flow's), ``fp16`` or ``bf16``; ``max_overflow_skips`` (fp16 only) consecutive GradScaler skips
    stop the run. ``checkpoints_total_limit``: the newest accelerate checkpoints kept (null: all;
    about 0.6 GB each for the 36M-parameter UNet: weights, Adam moments, EMA). ``ema_decay``: the
    EMA's decay cap (``replication/gpu_common/ema.py``; 0: no EMA, the weights are used as trained); the
    EMA is what the pair bank, the students' teacher, the FID and the samples use."""

    grad_accum: int = 1
    mixed_precision: str = "no"
    max_overflow_skips: int = 20
    checkpoints_total_limit: int | None = 2
    ema_decay: float = STUDENT_EMA_DECAY

    def check_accelerate_keys(self, where: str) -> None:
        require(self.grad_accum >= 1, f"{where}.grad_accum", self.grad_accum, "must be >= 1")
        require(self.mixed_precision in PRECISIONS, f"{where}.mixed_precision", self.mixed_precision,
                f"one of {PRECISIONS}")
        require(self.max_overflow_skips >= 1, f"{where}.max_overflow_skips", self.max_overflow_skips,
                "must be >= 1")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
                f"{where}.checkpoints_total_limit", self.checkpoints_total_limit, "null or >= 1")
        require(0 <= self.ema_decay < 1, f"{where}.ema_decay", self.ema_decay, "must lie in [0, 1) (0: no EMA)")

    def accelerate_inactive(self) -> dict[str, str]:
        unused = {"snapshot_every": "the accelerate trainer keeps the newest checkpoints_total_limit "
                                    "checkpoints instead"}
        if self.mixed_precision != "fp16":
            unused["max_overflow_skips"] = "only mixed_precision = 'fp16' has a GradScaler that skips steps"
        return unused

    def computation(self) -> dict:
        """The keys that change what training computes (part of a run's fingerprint)."""
        return {"grad_accum": self.grad_accum, "mixed_precision": self.mixed_precision,
                "ema_decay": self.ema_decay}
# ---------------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig(TrainConfig, AccelerateKeys):
    """Section ``cifar10_teacher``: flow-matching training of the teacher (1-rectified flow), with the
    ``AccelerateKeys``."""

    steps: int = 200000
    lr: float = 2e-4
    warmup: int = 5000
    checkpoint_every: int = 5000
    log_every: int = 100
    ema_decay: float = TEACHER_EMA_DECAY

    def validate(self, where: str) -> None:
        self.check_accelerate_keys(where)

    def inactive_fields(self) -> dict[str, str]:
        return self.accelerate_inactive()


@dataclass
class StudentsConfig(TrainConfig, AccelerateKeys):
    """Section ``cifar10_students``: every student starts from the teacher's trained (not averaged)
    weights, as Rectified Flow's reflow does (``run_lib_reflow.py`` loads the checkpoint's ``model``,
    its EMA teacher only solves for pairs), and trains with these optimizer settings and the
    ``AccelerateKeys``. ``perflow``: the online window solve of PeRFlow students (starts from
    noised data); ``ma``: the MA settings shared by every student with ``ma: true`` (a student may
    override ``weight`` and ``substeps``), scored by the teacher cut off at ``t_max``.

    ``dropout`` replaces ``cifar10.model.dropout`` in the students (the weights are the same). It is
    0 by default and must be 0 for MA with ``divergence: hutchinson_fd``: that estimate differences
    two evaluations of the network, which would draw two dropout masks, and the masks' difference
    divided by ``fd_step`` would swamp the divergence.
    """

    steps: int = 50000
    lr: float = 5e-5
    checkpoint_every: int = 5000
    log_every: int = 100
    dropout: float = 0.0
    t_max: float = 0.99
    perflow: PeRFlowConfig = field(default_factory=lambda: PeRFlowConfig(teacher_steps=8, solver="euler"))
    ma: MAConfig = field(default_factory=lambda: MAConfig(weight=0.1, substeps=1, divergence="hutchinson_fd"))
    students: dict[str, StudentSpec] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(len(self.students) >= 1, f"{where}.students", self.students, "need at least one student")
        for name in self.students:
            require(name != "teacher" and name.isidentifier(), f"{where}.students.{name}", name,
                    "a Python identifier other than 'teacher' (FID rows are keyed by it)")
        require(0 < self.t_max < 1, f"{where}.t_max", self.t_max, "must lie in (0, 1)")
        require(0 <= self.dropout < 1, f"{where}.dropout", self.dropout, "must lie in [0, 1)")
        fd = [name for name, spec in self.students.items() if spec.ma and self.ma.divergence == "hutchinson_fd"]
        require(self.dropout == 0 or not fd, f"{where}.dropout", self.dropout,
                f"must be 0 with ma.divergence 'hutchinson_fd' (students {fd}): its two network "
                f"evaluations would draw different dropout masks")
        check_window_weights(self.students, self.ma, where)
        self.check_accelerate_keys(where)
        if not self.inactive_fields().get("ma"):
            require(self.ma.batch_fraction == 1, f"{where}.ma.batch_fraction", self.ma.batch_fraction,
                    "must be 1: a fraction of each process's micro-batch is not a fraction of the "
                    "global batch, so the step would depend on the process count")

    def student_unet(self, shared: UNetConfig) -> UNetConfig:
        """The students' UNet: ``shared`` with this section's ``dropout``."""
        return replace(shared, dropout=self.dropout)

    def inactive_fields(self) -> dict[str, str]:
        unused = unused_pairing_sections(self.students, PAIRING_SECTIONS)
        own = {key: why for key, why in unused.items() if key in ("perflow", "ma")}
        if "ma" in own:
            own["t_max"] = "only the MA term uses the teacher's score (no student has ma: true)"
        return {**own, **self.accelerate_inactive()}

    def runs(self) -> list[tuple[str, int]]:
        """Every ``(student, seed)`` training run, in order."""
        return [(name, seed) for name, s in self.students.items() for seed in s.seeds]


@dataclass
class FIDConfig:
    """Section ``cifar10_fid``: FID of ``n_samples`` Euler samples per model and NFE against the first
    ``n_reference`` training images; ``batch_size`` samples are generated at a time (torch-fidelity
    reads at most 200 at a time).

    ``nfe``: the students' step counts; ``teacher_nfe``: the teacher's (for reference).
    ``feature_extractor`` is a torch-fidelity extractor name; on a machine without network pass the
    local Inception weights file (``pt_inception-2015-12-05-6726825d.pth``) as
    ``feature_extractor_weights_path``. ``grid_images``: samples in each saved grid (0: none).
    ``save_cpu_ram``: torch-fidelity reads images in the main process (no loader workers).
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
        require_each(self, where, ("n_samples", "n_reference", "batch_size"), lambda v: v >= 2, ">= 2")
        require(self.n_reference <= 50000, f"{where}.n_reference", self.n_reference, "<= 50000")
        check_nfe_list(self.nfe, f"{where}.nfe")
        check_nfe_list(self.teacher_nfe, f"{where}.teacher_nfe", allow_empty=True)
        require(self.grid_images >= 0, f"{where}.grid_images", self.grid_images, ">= 0")


#: the tier's sections in replication/gpu/params.yaml, each onto its dataclass
SECTIONS: dict[str, type] = {"cifar10": Cifar10Config, "cifar10_teacher": TeacherConfig,
                             "cifar10_pairs": ReflowPairConfig, "cifar10_students": StudentsConfig,
                             "cifar10_fid": FIDConfig}
