"""CIFAR-10 training stages on the shared ``marflow_core`` training loop.

Images are ``(B, 3, 32, 32)`` in ``[-1, 1]``; the velocity field is the core's ``UNetVelocity`` (a
diffusers ``UNet2DModel``), and every core sampler, loss and the MA term work on them as they are.

- ``cifar10_teacher``: 1-rectified flow, i.e. flow matching with independent pairs
  ``(x0 ~ N(0, I), x1 ~ data)`` (``FlowMatchingObjective``);
- ``cifar10_pairs``: the reflow pair bank ``(x0, Phi^T(x0))`` (``generate_reflow_pairs``);
- ``cifar10_students``: every ``(student, seed)`` run, initialised from the teacher's weights and
  trained by ``DistillationObjective`` with its method's pairing: ``teacher_pairs`` draws from the
  pair bank (``ReflowPairSampler``), ``windows`` from noised training images and the teacher's online
  window solve (``PeRFlowSampler``); plus the MA term for students with ``ma: true``.

A run folder is resumed only if it was made with the same parameters, the same training code and
(for the pair bank and the students) the same teacher checkpoint; otherwise it is cleared and the run
starts over (``replication.common.runs``), so no parameter change is silently ignored. The code
fingerprint is the import closure of this module (and of the student's method module): editing the
FID code (``evaluate.py``) retrains nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from marflow_core import (
    DistillationObjective,
    FlowMatchingObjective,
    PeRFlowSampler,
    ReflowPairConfig,
    ReflowPairSampler,
    TimeWindows,
    VelocityTeacher,
    WindowBatch,
    generate_reflow_pairs,
    load_checkpoint,
    load_pairs,
    train,
)
from marflow_core.unet import UNetConfig, UNetVelocity

from ..common import fingerprint
from ..common.methods import method_module
from ..common.runs import check_run_dir, prepare_run_dir
from ..common.students import StudentSpec
from .config import CHANNELS, SIZE, Cifar10Config, StudentsConfig, TeacherConfig
from .data import load_cifar10

LAST = "last.pt"
STAMP = "fingerprint.json"  # written by prepare_run_dir
#: the module that decides what training produces (its import closure is the code fingerprint)
TRAINING_MODULE = "replication.cifar10.tier"


def code_digest(student: StudentSpec | None = None) -> str:
    """The training code a run depends on (with the student's method module when given)."""
    extra = [method_module(student.method)] if student is not None else []
    return fingerprint.code_digest([TRAINING_MODULE, *extra])


def make_model(model: UNetConfig) -> UNetVelocity:
    return UNetVelocity(CHANNELS, SIZE, model)


def ckpt(cfg: Cifar10Config, *parts: str) -> Path:
    return Path(cfg.checkpoint_dir).joinpath(*parts)


def student_dir(cfg: Cifar10Config, name: str, seed: int) -> Path:
    return ckpt(cfg, "students", name, f"seed{seed}")


def teacher_meta(cfg: Cifar10Config) -> dict:
    """What a teacher checkpoint must have been made for (checked on every load)."""
    return {"tier": "cifar10", "role": "teacher", "model": asdict(cfg.model)}


def student_meta(model: UNetConfig, name: str, seed: int, student: StudentSpec) -> dict:
    """What a student checkpoint must have been made for (its other seeds do not matter)."""
    spec = {k: v for k, v in asdict(student).items() if k != "seeds"}
    return {"tier": "cifar10", "role": "student", "model": asdict(model), "name": name, "seed": seed,
            **spec}


@dataclass
class OnDevice:
    """Moves the window batch of a CPU-held sampler (a pair bank) to ``device``."""

    sampler: ReflowPairSampler
    device: str

    def __call__(self, batch, generator: torch.Generator | None) -> WindowBatch:
        wb = self.sampler(batch, generator)
        return WindowBatch(*(getattr(wb, f.name).to(self.device) for f in dataclasses.fields(wb)))


def data_batches(images: torch.Tensor, batch_size: int, hflip: bool, device: str):
    """``batch_fn(step, generator)``: ``batch_size`` random training images ``(B, 3, 32, 32)``, each
    flipped left-right with probability 1/2 when ``hflip``, on ``device``."""

    def batch_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx]
        if hflip:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.to(device)

    return batch_fn


def train_images(cfg: Cifar10Config) -> torch.Tensor:
    """The first ``data.n_train`` training images; fewer on disk is an error."""
    images = load_cifar10(cfg.data.root, "train")[0]
    if len(images) < cfg.data.n_train:
        raise ValueError(f"cifar10.data.n_train = {cfg.data.n_train}: {cfg.data.root} holds only "
                         f"{len(images)} training images")
    return images[: cfg.data.n_train]


def summary(result) -> dict:
    return {"steps": result.steps, "last": result.history[-1] if result.history else {}}


def stage_teacher(configs: dict, progress: bool = True) -> dict:
    """Train (or resume) the flow-matching teacher into ``checkpoint_dir/teacher``."""
    cfg: Cifar10Config = configs["cifar10"]
    teacher_cfg: TeacherConfig = configs["cifar10_teacher"]
    run_dir = ckpt(cfg, "teacher")
    prepare_run_dir(run_dir, {"seed": cfg.seed, "data": asdict(cfg.data), "model": asdict(cfg.model),
                              "train": asdict(teacher_cfg.train_config()), "code": code_digest()})
    torch.manual_seed(cfg.seed)  # the initial weights (and the dropout stream)
    model = make_model(cfg.model).to(cfg.device)
    batch_fn = data_batches(train_images(cfg), teacher_cfg.batch_size, cfg.data.hflip, cfg.device)
    result = train(model, FlowMatchingObjective(), batch_fn, teacher_cfg.train_config(), run_dir,
                   progress=progress, desc="cifar10 teacher", meta=teacher_meta(cfg), seed=cfg.seed)
    return summary(result)


def load_teacher(cfg: Cifar10Config) -> tuple[UNetVelocity, dict]:
    """The trained teacher, frozen, in eval mode on ``cfg.device``, and its identity (its run's
    fingerprint and checkpoint step), part of every fingerprint of a run that uses it. An unfinished
    teacher run is refused."""
    path = ckpt(cfg, "teacher", LAST)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher checkpoint {path}: run the cifar10_teacher stage first")
    model = make_model(cfg.model)
    state = load_checkpoint(path, model, teacher_meta(cfg))
    if state["step"] < state["config"]["steps"]:
        raise RuntimeError(f"{path}: the teacher run stopped at step {state['step']} of "
                           f"{state['config']['steps']}: finish the cifar10_teacher stage first")
    stamp = path.parent / STAMP
    identity = {"run": json.loads(stamp.read_text()) if stamp.is_file() else None, "step": state["step"]}
    return model.to(cfg.device).eval().requires_grad_(False), identity


def pair_bank(cfg: Cifar10Config, pairs: ReflowPairConfig, teacher: UNetVelocity, identity: dict,
              progress: bool = True) -> list[Path]:
    """The pair bank's shards in ``checkpoint_dir/pairs``, generated where missing. The bank is kept
    for the same teacher, seed and solve; ``n_pairs`` may grow (finished shards are reused), and
    ``batch_size`` only sets how many rows go through one teacher solve."""
    bank_dir = ckpt(cfg, "pairs")
    solve = {k: v for k, v in asdict(pairs).items() if k not in ("n_pairs", "batch_size")}
    prepare_run_dir(bank_dir, {"teacher": identity, "seed": cfg.seed, "pairs": solve, "code": code_digest()})
    return generate_reflow_pairs(teacher, bank_dir, pairs.n_pairs, pairs.shard_size, (CHANNELS, SIZE, SIZE),
                                 base_seed=cfg.seed, steps=pairs.steps, method=pairs.solver,
                                 device=cfg.device, progress=progress, batch_size=pairs.batch_size)


def stage_pairs(configs: dict, progress: bool = True) -> dict:
    cfg: Cifar10Config = configs["cifar10"]
    pairs: ReflowPairConfig = configs["cifar10_pairs"]
    teacher, identity = load_teacher(cfg)
    paths = pair_bank(cfg, pairs, teacher, identity, progress)
    return {"shards": len(paths), "n_pairs": pairs.n_pairs}


def build_student_objective(cfg: Cifar10Config, students: StudentsConfig, student: StudentSpec,
                            teacher: UNetVelocity, bank):
    """``(objective, batch_fn)`` of one student, by its method's pairing; ``bank()`` gives the pair
    bank ``(x0, x1)`` (held on the CPU)."""
    pairing = student.record.pairing
    if pairing == "teacher_pairs":
        x0, x1 = bank()
        sampler = OnDevice(ReflowPairSampler(x0, x1, students.batch_size), cfg.device)
        batch_fn = lambda step, generator: None  # noqa: E731  the pair bank is the data
    elif pairing == "windows":
        sampler = PeRFlowSampler.from_config(TimeWindows(student.windows), teacher, students.perflow)
        batch_fn = data_batches(train_images(cfg), students.batch_size, cfg.data.hflip, cfg.device)
    else:
        raise NotImplementedError(f"the CIFAR-10 tier has no builder for pairing {pairing!r}")
    ma = student.ma_config(students.ma)
    score = VelocityTeacher(teacher, students.t_max) if ma is not None else None
    return DistillationObjective(sampler, score, ma, student.record.distance), batch_fn


def student_fingerprint(cfg: Cifar10Config, students: StudentsConfig, pairs: ReflowPairConfig,
                        student: StudentSpec, seed: int, teacher_identity: dict) -> dict:
    """Everything a student run depends on: only its own pairing's settings, MA only with MA."""
    stamp = {"teacher": teacher_identity, "model": asdict(students.student_unet(cfg.model)), "seed": seed,
             "student": {k: v for k, v in asdict(student).items() if k != "seeds"},
             "train": asdict(students.train_config()), "code": code_digest(student)}
    if student.record.pairing == "teacher_pairs":
        stamp["pairs"] = {"seed": cfg.seed, **{k: v for k, v in asdict(pairs).items() if k != "batch_size"}}
    else:
        stamp.update(perflow=asdict(students.perflow), data=asdict(cfg.data))
    ma = student.ma_config(students.ma)
    if ma is not None:
        stamp.update(ma=asdict(ma), t_max=students.t_max)
    return stamp


def stage_students(configs: dict, progress: bool = True) -> dict:
    """Train (or resume) every ``(student, seed)`` run into ``checkpoint_dir/students/<name>/seed<s>``."""
    cfg: Cifar10Config = configs["cifar10"]
    pairs: ReflowPairConfig = configs["cifar10_pairs"]
    students: StudentsConfig = configs["cifar10_students"]
    teacher, identity = load_teacher(cfg)
    unet = students.student_unet(cfg.model)
    loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def bank() -> tuple[torch.Tensor, torch.Tensor]:
        if not loaded:
            loaded["pairs"] = load_pairs(pair_bank(cfg, pairs, teacher, identity, progress))
        return loaded["pairs"]

    out: dict[str, dict] = {}
    for name, seed in students.runs():
        student = students.students[name]
        run_dir = student_dir(cfg, name, seed)
        prepare_run_dir(run_dir, student_fingerprint(cfg, students, pairs, student, seed, identity))
        objective, batch_fn = build_student_objective(cfg, students, student, teacher, bank)
        torch.manual_seed(seed)  # the dropout stream
        model = make_model(unet).to(cfg.device)
        model.load_state_dict(teacher.state_dict())  # students start from the teacher
        model.requires_grad_(True)
        result = train(model, objective, batch_fn, students.train_config(), run_dir, progress=progress,
                       desc=f"cifar10 {name} seed {seed}", meta=student_meta(unet, name, seed, student),
                       seed=seed)
        out.setdefault(name, {})[f"seed{seed}"] = summary(result)
    return out


def load_student(cfg: Cifar10Config, students: StudentsConfig, name: str, seed: int) -> UNetVelocity:
    """A trained student, in eval mode on ``cfg.device``."""
    path = student_dir(cfg, name, seed) / LAST
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}: run the cifar10_students stage first")
    student = students.students[name]
    check_run_dir(path.parent, {"student": {k: v for k, v in asdict(student).items() if k != "seeds"},
                                "seed": seed, "train": asdict(students.train_config()),
                                "model": asdict(students.student_unet(cfg.model)), "code": code_digest(student)},
                  "rerun the cifar10_students stage first")
    unet = students.student_unet(cfg.model)
    model = make_model(unet)
    load_checkpoint(path, model, student_meta(unet, name, seed, student))
    return model.to(cfg.device).eval()
