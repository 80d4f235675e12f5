"""Builds the 2-D tier's pieces from configs: teacher, students, objectives, training, loading."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from marflow_core import (
    DistillationObjective,
    LossTerms,
    GaussianMixtureTeacher,
    PeRFlowSampler,
    ReflowPairSampler,
    TimeMLP,
    TimeWindows,
    TrainResult,
    generate_reflow_pairs,
    load_checkpoint,
    load_pairs,
)
from marflow_core import train as train_loop

from ..common import fingerprint
from ..common.methods import method_module
from ..common.runs import check_run_dir, prepare_run_dir
from ..common.students import StudentSpec
from .config import PAIRING_SECTIONS, Toy2DConfig, TrainStageConfig

DIM = 2


def make_teacher(cfg: Toy2DConfig) -> GaussianMixtureTeacher:
    m = cfg.mixture
    return GaussianMixtureTeacher(m.weights, m.means, m.stds, device=cfg.device)


def make_model(train_cfg: TrainStageConfig, device: str = "cpu") -> TimeMLP:
    return TimeMLP.from_config(DIM, train_cfg.model).to(device)


@dataclass
class TrainedStudent:
    name: str
    config: StudentSpec
    model: TimeMLP
    windows: TimeWindows
    history: list[dict[str, float]]


def build_objective(
    student: StudentSpec,
    train_cfg: TrainStageConfig,
    teacher: GaussianMixtureTeacher,
    pair_dir: Path,
    progress: bool = True,
    seed: int = 0,
):
    """(objective, batch_fn) for one student, by its method's pairing: teacher pairs read the pair
    bank (generated from ``seed``'s ``reflow-shard`` streams); windows draw fresh data and solve the
    teacher online. The method's trajectory distance and the student's MA settings complete it."""
    record = student.record
    if record.pairing == "teacher_pairs":
        p = train_cfg.reflow_pairs
        device = teacher.means.device
        paths = generate_reflow_pairs(teacher, pair_dir, p.n_pairs, p.shard_size, (DIM,),
                                      base_seed=seed, steps=p.steps, method=p.solver, device=device,
                                      progress=progress, batch_size=p.batch_size)
        x0, x1 = load_pairs(paths)
        sampler = ReflowPairSampler(x0.to(device), x1.to(device), train_cfg.batch_size)
        batch_fn = lambda step, gen: None  # noqa: E731  (the pair bank is the data)
    else:
        sampler = PeRFlowSampler.from_config(TimeWindows(student.windows), teacher, train_cfg.perflow)
        batch_fn = lambda step, gen: teacher.sample(train_cfg.batch_size, 1.0, gen)  # noqa: E731
    objective = DistillationObjective(sampler, teacher, student.ma_config(train_cfg.ma), record.distance)
    return objective, batch_fn


#: what a student's loss is made of: ``tm+ma`` the method's own (``L_TM + lambda L_MA``), ``ma`` the
#: MA term alone (the ablation's "MA only": no trajectory matching)
LOSS_TERMS: tuple[str, ...] = ("tm+ma", "ma")


@dataclass
class MAOnlyObjective:
    """``lambda L_MA`` alone on the window batch of ``inner`` (a ``DistillationObjective`` with MA on
    every step): the trajectory-matching term is computed (it is logged) but not optimized."""

    inner: DistillationObjective

    def __call__(self, model, batch, step: int, generator) -> LossTerms:
        terms = self.inner(model, batch, step, generator)
        if terms.first_term is None:
            raise ValueError("MA-only training needs the MA term on every step: ma.weight > 0 and ma.every = 1")
        total = terms.total - terms.first_term
        return LossTerms(total, {**terms.parts, "total": float(total.detach())})


#: the tier's module that decides what training produces: the code fingerprint of a run is the import
#: closure of this module and of the student's method module (``replication.common.fingerprint``), so
#: editing a metric re-runs evaluation without retraining, and a new method retrains no other student
TRAINING_MODULE = "replication.toy2d.tier"


def code_digest(student: StudentSpec | None = None) -> str:
    """The training code a run depends on (the pair bank's when ``student`` is None)."""
    extra = [method_module(student.method)] if student is not None else []
    return fingerprint.code_digest([TRAINING_MODULE, *extra])


def train_student(
    name: str,
    student: StudentSpec,
    train_cfg: TrainStageConfig,
    toy: Toy2DConfig,
    checkpoint_root: Path,
    progress: bool = True,
    terms: str = "tm+ma",
):
    """Train (or resume) one student into ``checkpoint_root/<name>/``: its seed initialises the
    model and drives its steps; the pair bank comes from ``toy.seed``. ``terms`` (``LOSS_TERMS``)
    says which loss terms are optimized."""
    if terms not in LOSS_TERMS:
        raise ValueError(f"terms = {terms!r}: unknown; known: {LOSS_TERMS}")
    teacher = make_teacher(toy)
    pair_dir = checkpoint_root / "reflow_pairs"
    pairing = student.record.pairing
    if pairing == "teacher_pairs":
        prepare_run_dir(pair_dir, {"toy2d": asdict(toy), "code": code_digest(),
                                   "pairs": asdict(train_cfg.reflow_pairs)})
    (seed,) = student.seeds
    prepare_run_dir(checkpoint_root / name, run_fingerprint(student, train_cfg, toy, terms))
    objective, batch_fn = build_objective(student, train_cfg, teacher, pair_dir, progress, toy.seed)
    if terms == "ma":
        objective = MAOnlyObjective(objective)
    torch.manual_seed(seed)
    model = make_model(train_cfg, toy.device)
    return train_loop(model, objective, batch_fn, train_cfg.train_config(), checkpoint_root / name,
                      progress, desc=name, meta=student_meta(name, student), seed=seed)


def run_fingerprint(student: StudentSpec, train_cfg: TrainStageConfig, toy: Toy2DConfig,
                    terms: str = "tm+ma") -> dict:
    """What a student's run folder is made from: the tier, the student, the training params its
    pairing uses, its MA settings, the optimized loss terms (recorded when not the method's own)
    and its code (``fingerprint.json``; checked on every load)."""
    used = PAIRING_SECTIONS[student.record.pairing]
    train = {k: v for k, v in asdict(train_cfg).items()
             if k not in ("students", "ma", *PAIRING_SECTIONS.values()) or k == used}
    return {"toy2d": asdict(toy), "code": code_digest(student), "student": asdict(student),
            "train": train, "ma": asdict(train_cfg.ma) if student.ma else None,
            **({"terms": terms} if terms != "tm+ma" else {})}


def student_meta(name: str, student: StudentSpec) -> dict:
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
    """Long-format frame (student, step, term, value) of every logged loss part but ``total``
    (``tm`` and ``ma`` under their ``LOSS_LABELS``, any other part under its own name)."""
    import pandas as pd

    rows = [{"student": name, "step": record["step"], "term": LOSS_LABELS.get(part, part),
             "value": value}
            for name, history in histories.items() for record in history
            for part, value in record.items() if part not in ("step", "total")]
    return pd.DataFrame(rows)


def load_student(
    name: str, train_cfg: TrainStageConfig, toy: Toy2DConfig, checkpoint_root: Path,
    checkpoint: str = "last.pt",
) -> TrainedStudent:
    """A trained student from ``checkpoint_root/<name>/<checkpoint>``, in eval mode on
    ``toy.device``; a run made with other params or code than these is refused (``StaleRunError``)."""
    return load_run(name, train_cfg.students[name], train_cfg, toy, checkpoint_root, checkpoint,
                    "rerun the toy2d_train stage (dvc repro toy2d_train) before evaluating")


def load_run(
    name: str, student: StudentSpec, train_cfg: TrainStageConfig, toy: Toy2DConfig, checkpoint_root: Path,
    checkpoint: str = "last.pt", rebuild: str = "rerun the stage that trains it", terms: str = "tm+ma",
) -> TrainedStudent:
    """The run ``checkpoint_root/<name>`` of ``student`` (one seed) trained with ``train_cfg``, in eval
    mode; refused (``StaleRunError``) when its fingerprint says other params or code made it."""
    path = checkpoint_root / name / checkpoint
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}: {rebuild} (dvc repro)")
    check_run_dir(path.parent, run_fingerprint(student, train_cfg, toy, terms), rebuild)
    model = make_model(train_cfg, toy.device)
    state = load_checkpoint(path, model, student_meta(name, student))
    model.eval().requires_grad_(False)
    return TrainedStudent(name, student, model, TimeWindows(student.windows), state["history"])
