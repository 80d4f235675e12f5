"""Builds the image tier's pieces from configs: data, teacher, students, training, loading, sampling.

Images stay image-shaped, ``(B, C, H, W)`` in ``[-1, 1]``; the library is shape-generic. Teacher and
students share one ``UNetVelocity`` architecture; every student starts from the teacher's weights
(as PeRFlow and 2-rectified flow do), so its training seeds differ in data order, times and probes.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from marflow_core import (
    DistillationObjective,
    FlowMatchingObjective,
    MAConfig,
    ReflowPairSampler,
    TimeWindows,
    TrainConfig,
    TrainResult,
    VelocityTeacher,
    WindowBankSampler,
    generate_reflow_pairs,
    generate_window_bank,
    load_checkpoint,
    load_pairs,
    load_window_bank,
    stream,
    train,
)
from marflow_core.banks import shard_seed
from marflow_core.marginal import ma_surrogate
from marflow_core.trajectory import WindowBatch, trajectory_matching_loss
from marflow_core.unet import UNetVelocity

from ..common import fingerprint
from ..common.methods import method_module
from ..common.runs import check_run_dir, prepare_run_dir
from ..common.students import StudentSpec
from .config import PAIRING_SECTIONS, ImagesConfig, StudentsStageConfig, TeacherStageConfig
from .data import (
    QUANTIZATION_STEP,
    ImageSplit,
    dequantize,
    load_digits_split,
    load_image_folder_split,
    load_mnist_split,
)

#: the tier's module that decides what training produces: a run's code fingerprint is the import
#: closure of this module and of its student's method module (``replication.common.fingerprint``)
TRAINING_MODULE = "replication.images.tier"
TEACHER_DIR, REFERENCE_DIR, STUDENTS_DIR = "teacher", "reference", "students"


def code_digest(student: StudentSpec | None = None) -> str:
    """The training code a run depends on (the teacher's and the banks' when ``student`` is None)."""
    extra = [method_module(student.method)] if student is not None else []
    return fingerprint.code_digest([TRAINING_MODULE, *extra])


def load_split(cfg: ImagesConfig) -> ImageSplit:
    """The train / held-out split of the configured dataset, in ``[-1, 1]``."""
    if cfg.dataset == "digits":
        return load_digits_split(cfg.heldout_fraction, cfg.seed)
    if cfg.dataset == "mnist":
        return load_mnist_split(cfg.size, cfg.heldout_fraction, cfg.seed)
    return load_image_folder_split(cfg.folder, cfg.size, cfg.channels, cfg.heldout_fraction, cfg.seed)


def make_model(cfg: ImagesConfig) -> UNetVelocity:
    return UNetVelocity(cfg.channels, cfg.size, cfg.model).to(cfg.device)


def data_noise(images: ImagesConfig):
    """``noise(x, generator)`` turning stored images into draws of the tier's data law (uniform
    dequantization of the dataset's quantization step), or None for ``dequantize: none``."""
    if images.dequantize == "none":
        return None
    step = QUANTIZATION_STEP[images.dataset]
    return lambda x, gen: dequantize(x, step, gen)


def data_batches(data: torch.Tensor, batch_size: int, noise=None):
    """``batch_fn(step, generator)``: ``batch_size`` training images drawn with replacement, then
    ``noise(x, generator)`` (fresh per batch) when given."""
    def batch(step, gen):
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen).to(data.device)]
        return x if noise is None else noise(x, gen)

    return batch


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class RunCost:
    """What one training run cost: steps trained in this process, seconds per step, peak RSS."""

    steps_trained: int
    resumed_from: int
    seconds_per_step: float | None
    peak_rss_mib: float


def run_cost(result: TrainResult) -> RunCost:
    trained = result.steps - result.resumed_from
    per_step = result.wall_seconds / trained if trained else None
    return RunCost(trained, result.resumed_from, per_step, peak_rss_mib())


# --- teacher ---------------------------------------------------------------------------------------

def teacher_meta(images: ImagesConfig) -> dict:
    return {"tier": "images", "role": "teacher", "dataset": images.dataset, "size": images.size}


def teacher_fingerprint(images: ImagesConfig, cfg: TeacherStageConfig | None = None) -> dict:
    """What the teacher's run folder is made from (``cfg`` None: the part a stage that does not read
    ``images_teacher`` can check: the data, the backbone and the code)."""
    out = {"images": asdict(images), "code": code_digest()}
    return out if cfg is None else {**out, "teacher": asdict(cfg)}


def train_teacher(images: ImagesConfig, cfg: TeacherStageConfig, root: Path,
                  progress: bool = True) -> TrainResult:
    """Flow-matching training (or resumption) of the teacher into ``root/teacher``."""
    split = load_split(images)
    run_dir = root / TEACHER_DIR
    prepare_run_dir(run_dir, teacher_fingerprint(images, cfg))
    torch.manual_seed(cfg.seed)
    model = make_model(images)
    data = split.train.to(images.device)
    batches = data_batches(data, cfg.batch_size, data_noise(images))
    return train(model, FlowMatchingObjective(), batches, cfg.train_config(), run_dir, progress,
                 desc="teacher", meta=teacher_meta(images), seed=cfg.seed)


def load_teacher(images: ImagesConfig, root: Path,
                 cfg: TeacherStageConfig | None = None) -> tuple[UNetVelocity, list[dict]]:
    """The trained teacher (eval mode, frozen) and its loss history; a run made with other params
    (``images``, and ``cfg`` when given) or other code is refused (``StaleRunError``)."""
    path = root / TEACHER_DIR / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"no teacher checkpoint {path}: run the images_teacher stage first "
                                f"(dvc repro)")
    check_run_dir(path.parent, teacher_fingerprint(images, cfg),
                  "rerun the images_teacher stage (dvc repro images_teacher) first")
    model = make_model(images)
    state = load_checkpoint(path, model, teacher_meta(images))
    return model.eval().requires_grad_(False), state["history"]


# --- students --------------------------------------------------------------------------------------

def student_meta(name: str, seed: int, student: StudentSpec) -> dict:
    fields = {k: v for k, v in asdict(student).items() if k != "seeds"}
    return {"tier": "images", "student": name, "seed": seed, **fields}


def student_dir(root: Path, name: str, seed: int) -> Path:
    return root / STUDENTS_DIR / "runs" / name / f"seed{seed}"


def bank_name(student: StudentSpec) -> str:
    """The bank a student trains on: the pair bank, or the window bank of its window count."""
    if student.record.pairing == "teacher_pairs":
        return "reflow_pairs"
    return f"window_bank_K{student.windows}"


def _bank_sampler(student: StudentSpec, cfg: StudentsStageConfig, images: ImagesConfig,
                  teacher_net: UNetVelocity, data: torch.Tensor, root: Path, progress: bool,
                  heldout: bool = False):
    """The window-batch sampler of a student's bank: the pair bank (teacher pairs) or the window bank
    of its window count, generated once and shared by all seeds and methods of that pairing. With
    ``heldout``, the small bank of ``cfg.heldout_entries`` rows that scores held-out losses: window
    pairs from ``data`` = the held-out split, or reflow pairs from fresh noise (its own seed), with
    one batch of all its rows."""
    windows = TimeWindows(student.windows)
    base = {"images": asdict(images), "code": code_digest()}
    name = bank_name(student) + ("_heldout" if heldout else "")
    bank_dir = root / STUDENTS_DIR / "banks" / name
    seed = shard_seed(images.seed, "heldout-bank", 0) if heldout else images.seed
    batch_size = cfg.heldout_entries if heldout else cfg.batch_size
    if student.record.pairing == "teacher_pairs":
        p = cfg.reflow_pairs
        n, shard = (cfg.heldout_entries, cfg.heldout_entries) if heldout else (p.n_pairs, p.shard_size)
        prepare_run_dir(bank_dir, {**base, "pairs": asdict(p), "rows": n, "seed": seed})
        paths = generate_reflow_pairs(teacher_net, bank_dir, n, shard, tuple(teacher_net.sample_shape),
                                      base_seed=seed, steps=p.steps, method=p.solver, device=images.device,
                                      progress=progress, batch_size=p.batch_size)
        x0, x1 = load_pairs(paths)
        return ReflowPairSampler(x0.to(images.device), x1.to(images.device), batch_size)
    p = cfg.window_bank
    if heldout:
        p = replace(p, n_entries=cfg.heldout_entries, shard_size=cfg.heldout_entries)
    prepare_run_dir(bank_dir, {**base, "bank": asdict(p), "windows": student.windows, "seed": seed})
    paths = generate_window_bank(teacher_net, data, windows, bank_dir, p, seed, progress, data_noise(images))
    bank = {k: v.to(images.device) for k, v in load_window_bank(paths).items()}
    return WindowBankSampler.from_bank(windows, bank, batch_size)


def build_objective(student: StudentSpec, cfg: StudentsStageConfig, images: ImagesConfig,
                    teacher_net: UNetVelocity, data: torch.Tensor, root: Path, progress: bool):
    """(objective, batch_fn) of one student, by its method's pairing: teacher pairs train on the
    pair bank, windows on the window bank (``_bank_sampler``)."""
    teacher = VelocityTeacher(teacher_net, t_max=cfg.t_max)
    sampler = _bank_sampler(student, cfg, images, teacher_net, data, root, progress)
    objective = DistillationObjective(sampler, teacher, student.ma_config(cfg.ma), student.record.distance)
    return objective, (lambda step, gen: None)  # the banks are the data


#: rows of the held-out window batch that score the final MA value (64 Jacobians of D x D each)
HELDOUT_MA_ROWS = 64


@dataclass
class HeldOut:
    """A fixed held-out window batch (one draw of times, from its own stream) of one student's
    pairing, scoring ``heldout_tm`` (every logged step) and the MA surrogate's value (at the end)."""

    batch: WindowBatch
    teacher: VelocityTeacher
    ma: MAConfig
    distance: object

    def tm(self, model: torch.nn.Module) -> dict[str, float]:
        """``{"heldout_tm": L_TM}`` on the whole held-out batch (no gradients)."""
        return {"heldout_tm": float(trajectory_matching_loss(model, self.batch, distance=self.distance))}

    def ma_value(self, model: torch.nn.Module) -> float:
        """The MA surrogate's value (per dimension) on the first ``HELDOUT_MA_ROWS`` held-out rows, with
        the student's MA settings (the shared ones for a student without MA), every row, no probes
        drawn for the discrete log-det: the same number for every student of one pairing."""
        ma = replace(self.ma, batch_fraction=1.0)
        with torch.enable_grad():
            value = ma_surrogate(model, self.teacher, self.batch.head(HELDOUT_MA_ROWS), ma,
                                 stream(0, "heldout-ma"))
        return float(value.detach())


def heldout(student: StudentSpec, cfg: StudentsStageConfig, images: ImagesConfig,
            teacher_net: UNetVelocity, root: Path, progress: bool = True) -> HeldOut:
    """The held-out scorer of ``student`` (its bank is generated once per pairing, from the held-out
    split of ``images``)."""
    data = load_split(images).heldout.to(images.device)
    sampler = _bank_sampler(student, cfg, images, teacher_net, data, root, progress, heldout=True)
    batch = sampler(None, stream(images.seed, "heldout-times"))
    return HeldOut(batch, VelocityTeacher(teacher_net, t_max=cfg.t_max),
                   student.ma_config(cfg.ma) or cfg.ma, student.record.distance)


def train_student(name: str, seed: int, images: ImagesConfig, cfg: StudentsStageConfig, root: Path,
                  teacher_net: UNetVelocity, data: torch.Tensor, progress: bool = True) -> TrainResult:
    """Train (or resume) one ``(student, seed)`` into ``root/students/<name>/seed<seed>``."""
    student = cfg.students[name]
    run_dir = student_dir(root, name, seed)
    prepare_run_dir(run_dir, student_fingerprint(name, seed, images, cfg, root))
    objective, batch_fn = build_objective(student, cfg, images, teacher_net, data, root, progress)
    scorer = heldout(student, cfg, images, teacher_net, root, progress)
    model = make_model(images)
    model.load_state_dict(teacher_net.state_dict())
    model.requires_grad_(True)
    return train(model, objective, batch_fn, cfg.train_config(), run_dir, progress,
                 desc=f"{name} seed {seed}", meta=student_meta(name, seed, student), seed=seed,
                 evaluate=scorer.tm)


def student_fingerprint(name: str, seed: int, images: ImagesConfig, cfg: StudentsStageConfig,
                        root: Path) -> dict:
    """What a ``(student, seed)`` run folder is made from: data and backbone, the student, the
    training params its pairing uses, its MA settings, its code and the teacher file's hash."""
    student = cfg.students[name]
    used = PAIRING_SECTIONS[student.record.pairing]
    train_keys = {k: v for k, v in asdict(cfg).items()
                  if k not in ("students", "ma", *PAIRING_SECTIONS.values()) or k == used}
    ma = student.ma_config(cfg.ma)
    return {"images": asdict(images), "student": asdict(student), "seed": seed, "train": train_keys,
            "ma": asdict(ma) if ma else None, "code": code_digest(student), "teacher": _teacher_digest(root)}


def _teacher_digest(root: Path) -> str:
    """The teacher checkpoint's content hash: students of another teacher are never resumed."""
    import hashlib

    return hashlib.sha256((root / TEACHER_DIR / "last.pt").read_bytes()).hexdigest()


def train_students(images: ImagesConfig, cfg: StudentsStageConfig, root: Path,
                   progress: bool = True) -> dict[tuple[str, int], tuple[TrainResult, RunCost]]:
    """Every ``(student, seed)`` run of ``cfg``, in order, with its cost."""
    teacher_net, _ = load_teacher(images, root)
    data = load_split(images).train.to(images.device)
    out = {}
    for name, seed in cfg.runs():
        result = train_student(name, seed, images, cfg, root, teacher_net, data, progress)
        out[(name, seed)] = (result, run_cost(result))
    return out


def build_banks(images: ImagesConfig, cfg: StudentsStageConfig, root: Path,
                progress: bool = True) -> dict[str, float]:
    """Generate (or find) every bank the students need, once; wall seconds per bank (0 if found)."""
    teacher_net, _ = load_teacher(images, root)
    data = load_split(images).train.to(images.device)
    seconds: dict[str, float] = {}
    for student in cfg.students.values():
        key = bank_name(student)
        if key not in seconds:
            tic = time.perf_counter()
            build_objective(student, cfg, images, teacher_net, data, root, progress)
            heldout(student, cfg, images, teacher_net, root, progress)
            seconds[key] = time.perf_counter() - tic
    return seconds


def load_student(name: str, seed: int, images: ImagesConfig, cfg: StudentsStageConfig,
                 root: Path) -> tuple[UNetVelocity, TimeWindows, list[dict]]:
    """A trained student (eval mode, frozen), its windows and its loss history."""
    student = cfg.students[name]
    path = student_dir(root, name, seed) / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}: run the images_students stage first (dvc repro)")
    check_run_dir(path.parent, student_fingerprint(name, seed, images, cfg, root),
                  "rerun the images_students stage (dvc repro images_students) before evaluating")
    model = make_model(images)
    state = load_checkpoint(path, model, student_meta(name, seed, student))
    return model.eval().requires_grad_(False), TimeWindows(student.windows), state["history"]


def optim_summary(cfg: TrainConfig) -> str:
    return f"batch {cfg.batch_size}, {cfg.steps} steps, lr {cfg.lr:g}"
