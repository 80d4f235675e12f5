"""Builds the 2-D tier's pieces from configs: teacher, students, objectives, training, loading."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from marflow_core import (
    DistillationObjective,
    GaussianMixtureTeacher,
    MAConfig,
    PeRFlowSampler,
    ReflowPairSampler,
    TimeMLP,
    TimeWindows,
    TrainResult,
    generate_reflow_pairs,
    load_checkpoint,
    load_pairs,
    train,
)

from .. import runs
from ..runs import prepare_run_dir
from .config import StudentConfig, Toy2DConfig, TrainStageConfig

DIM = 2


def make_teacher(cfg: Toy2DConfig) -> GaussianMixtureTeacher:
    m = cfg.mixture
    return GaussianMixtureTeacher(m.weights, m.means, m.stds, device=cfg.device)


def make_model(train_cfg: TrainStageConfig, device: str = "cpu") -> TimeMLP:
    return TimeMLP.from_config(DIM, train_cfg.model).to(device)


def ma_config(train_cfg: TrainStageConfig, student: StudentConfig) -> MAConfig | None:
    """The shared MA settings, with the student's own ``ma_weight`` if it sets one."""
    if not student.ma:
        return None
    if student.ma_weight is None:
        return train_cfg.ma
    return replace(train_cfg.ma, weight=student.ma_weight)


@dataclass
class TrainedStudent:
    name: str
    config: StudentConfig
    model: TimeMLP
    windows: TimeWindows
    history: list[dict[str, float]]


def build_objective(
    student: StudentConfig,
    train_cfg: TrainStageConfig,
    teacher: GaussianMixtureTeacher,
    pair_dir: Path,
    progress: bool = True,
    seed: int = 0,
):
    """(objective, batch_fn) for one student. Reflow reads the pair bank (generated from ``seed``'s
    ``reflow-shard`` streams); PeRFlow draws fresh data."""
    windows = TimeWindows(student.windows)
    if student.method == "reflow":
        p = train_cfg.reflow_pairs
        device = teacher.means.device
        paths = generate_reflow_pairs(teacher, pair_dir, p.n_pairs, p.shard_size, (DIM,),
                                      base_seed=seed, steps=p.steps, method=p.solver, device=device,
                                      progress=progress)
        x0, x1 = load_pairs(paths)
        sampler = ReflowPairSampler(x0.to(teacher.means.device), x1.to(teacher.means.device),
                                    train_cfg.batch_size)
        batch_fn = lambda step, gen: None  # noqa: E731  (the pair bank is the data)
    else:
        p = train_cfg.perflow
        sampler = PeRFlowSampler.from_config(windows, teacher, p)
        batch_fn = lambda step, gen: teacher.sample(train_cfg.batch_size, 1.0, gen)  # noqa: E731
    return DistillationObjective(sampler, teacher, ma_config(train_cfg, student)), batch_fn


#: the tier's modules that decide what training produces (evaluation code is not among them, so
#: editing a metric re-runs the evaluation stages without retraining)
TRAINING_SOURCES: tuple[str, ...] = ("config.py", "tier.py")


def source_digest() -> str:
    """The library's and this tier's training code (``runs.source_digest``)."""
    return runs.source_digest(Path(__file__).parent, TRAINING_SOURCES)


def train_student(
    name: str,
    student: StudentConfig,
    train_cfg: TrainStageConfig,
    toy: Toy2DConfig,
    checkpoint_root: Path,
    progress: bool = True,
):
    """Train (or resume) one student into ``checkpoint_root/<name>/``; same init seed for every student."""
    teacher = make_teacher(toy)
    base = {"toy2d": asdict(toy), "code": source_digest()}
    pair_dir = checkpoint_root / "reflow_pairs"
    if student.method == "reflow":
        prepare_run_dir(pair_dir, {**base, "pairs": asdict(train_cfg.reflow_pairs)})
    prepare_run_dir(checkpoint_root / name, {
        **base, "student": asdict(student),
        "train": {k: v for k, v in asdict(train_cfg).items()
                  if k != "students" and (k != "ma" or student.ma)}})
    objective, batch_fn = build_objective(student, train_cfg, teacher, pair_dir, progress, toy.seed)
    torch.manual_seed(toy.seed)
    model = make_model(train_cfg, toy.device)
    result = train(model, objective, batch_fn, train_cfg.train_config(toy.seed),
                   checkpoint_root / name, progress, desc=name, meta=student_meta(name, student))
    return result


def student_meta(name: str, student: StudentConfig) -> dict:
    """What a checkpoint of this student must have been made for (checked on every load)."""
    return {"tier": "toy2d", "student": name, **asdict(student)}


def train_students(
    train_cfg: TrainStageConfig, toy: Toy2DConfig, checkpoint_root: Path, progress: bool = True
) -> dict[str, TrainResult]:
    """Train (or resume) every student of ``train_cfg``, in order; results by name."""
    return {name: train_student(name, student, train_cfg, toy, checkpoint_root, progress)
            for name, student in train_cfg.students.items()}


LOSS_LABELS = {"tm": "trajectory matching L_TM", "ma": "MA surrogate L_MA"}


def loss_curves(histories: dict[str, list[dict[str, float]]]):
    """Long-format frame (student, step, term, value) of the logged ``tm`` and ``ma`` losses."""
    import pandas as pd

    rows = [{"student": name, "step": record["step"], "term": label, "value": record[part]}
            for name, history in histories.items() for record in history
            for part, label in LOSS_LABELS.items() if part in record]
    return pd.DataFrame(rows)


def load_student(
    name: str, train_cfg: TrainStageConfig, checkpoint_root: Path, checkpoint: str = "last.pt",
    device: str = "cpu",
) -> TrainedStudent:
    """A trained student from ``checkpoint_root/<name>/<checkpoint>``, in eval mode."""
    student = train_cfg.students[name]
    path = checkpoint_root / name / checkpoint
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}: run the toy2d_train stage first (dvc repro)")
    model = make_model(train_cfg, device)
    state = load_checkpoint(path, model, student_meta(name, student))
    model.eval().requires_grad_(False)
    return TrainedStudent(name, student, model, TimeWindows(student.windows), state["history"])
