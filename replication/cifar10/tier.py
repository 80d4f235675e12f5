"""CIFAR-10 training stages on the GPU tiers' accelerate loop (``train.py``,
``replication.gpu_common.accelerate_train``): ``accelerate launch -m replication.stage cifar10_teacher``
spreads a run over GPUs; ``python -m replication.stage ...`` runs it in one process.

Images are ``(B, 3, 32, 32)`` in ``[-1, 1]``; the velocity field is the core's ``UNetVelocity`` (a
diffusers ``UNet2DModel``), and the core's trajectory-matching loss, samplers and MA term work on
them as they are; each sample's randomness comes from its global position (``objective.py``).

- ``cifar10_teacher``: 1-rectified flow, i.e. flow matching with independent pairs
  ``(x0 ~ N(0, I), x1 ~ data)``;
- ``cifar10_pairs``: the reflow pair bank ``(x0, Phi^T(x0))`` of the EMA teacher
  (``generate_reflow_pairs``);
- ``cifar10_students``: every ``(student, seed)`` run, initialised from the teacher's trained weights
  and trained with its method's pairing: ``teacher_pairs`` reads the pair bank, ``windows`` noised
  training images and the EMA teacher's online window solve; plus the MA term (the EMA teacher's
  score) for students with ``ma: true``.

Every run keeps an EMA of its weights (``ema_decay``); the EMA is what the next stages use. A run
folder is resumed only if it was made with the same parameters, the same training code and (for
the pair bank and the students) the same teacher; otherwise it is cleared and the run starts over
(``replication.common.runs``), so no parameter change is silently ignored. The code fingerprint is
the import closure of this module (and of the student's method module): editing the FID code
(``evaluate.py``) retrains nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from marflow_core import (
    PeRFlowSampler,
    ReflowPairConfig,
    TimeWindows,
    VelocityTeacher,
    generate_reflow_pairs,
    load_pairs,
)
from marflow_core.integrity import verified_load
from marflow_core.unet import UNetConfig, UNetVelocity

from ..common import fingerprint
from ..common.methods import method_module
from ..common.runs import check_run_dir, prepare_run_dir
from ..common.students import StudentSpec
from ..gpu_common.accelerate_train import float32_passes
from .config import CHANNELS, SIZE, Cifar10Config, StudentsConfig, TeacherConfig
from .data import load_cifar10_uint8, to_unit_range
from .objective import CifarLoss, draw_samples, flipped, perflow_batch, straight_batch
from .train import FINAL, Run, load_final, train_run

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


def train_images(cfg: Cifar10Config) -> torch.Tensor:
    """The first ``data.n_train`` training images, uint8 ``(N, 3, 32, 32)``; fewer on disk is an error."""
    images = load_cifar10_uint8(cfg.data.root, "train")[0]
    if len(images) < cfg.data.n_train:
        raise ValueError(f"cifar10.data.n_train = {cfg.data.n_train}: {cfg.data.root} holds only "
                         f"{len(images)} training images")
    return images[: cfg.data.n_train]


def image_batch(images: torch.Tensor, rows: torch.Tensor, flip: torch.Tensor | None, device) -> torch.Tensor:
    """Training images ``rows`` in ``[-1, 1]`` on ``device``, mirrored where ``flip``."""
    x = to_unit_range(images[rows]).to(device)
    return x if flip is None else flipped(x, flip)


def teacher_fingerprint(cfg: Cifar10Config, teacher_cfg: TeacherConfig) -> dict:
    return {"seed": cfg.seed, "data": asdict(cfg.data), "model": asdict(cfg.model),
            "train": asdict(teacher_cfg.train_config()), "accelerate": teacher_cfg.computation(),
            "code": code_digest()}


def teacher_losses(cfg: Cifar10Config, images: torch.Tensor):
    """The teacher's loss builder: flow matching on each micro-batch's images (``objective.py``)."""
    loss = CifarLoss(tm_name="fm")

    def build(accelerator, model, plan):
        def micro_loss(step: int, micro: int):
            positions = plan.positions(step, micro, accelerator.process_index)
            draws = draw_samples(plan.generators(step, positions), (CHANNELS, SIZE, SIZE))
            x1 = image_batch(images, plan.items(positions), draws.flip if cfg.data.hflip else None,
                             accelerator.device)
            wb = straight_batch(draws.noise.to(x1), x1, draws.u)
            with accelerator.autocast():
                return loss(model, wb, step, None)

        return micro_loss

    return build


def stage_teacher(configs: dict, progress: bool = True) -> dict:
    """Train (or resume) the flow-matching teacher into ``checkpoint_dir/teacher``."""
    cfg: Cifar10Config = configs["cifar10"]
    teacher_cfg: TeacherConfig = configs["cifar10_teacher"]
    images = train_images(cfg)
    run = Run(ckpt(cfg, "teacher"), teacher_fingerprint(cfg, teacher_cfg), "cifar10_teacher", teacher_cfg,
              cfg.seed, teacher_meta(cfg), "cifar10 teacher")
    return train_run(run, lambda: make_model(cfg.model), len(images), teacher_losses(cfg, images), cfg.device,
                     progress)


def teacher_file(cfg: Cifar10Config) -> Path:
    """The finished teacher's ``final.pt``; a missing or unfinished one is refused."""
    path = ckpt(cfg, "teacher", FINAL)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher weights {path}: run (or finish) the cifar10_teacher stage first")
    return path


def load_teacher(cfg: Cifar10Config, device=None) -> tuple[UNetVelocity, dict]:
    """The trained teacher's EMA weights, frozen, in eval mode on ``device`` (default
    ``cfg.device``), and its identity (its run's fingerprint and step), part of every fingerprint of
    a run that uses it. An unfinished teacher run is refused."""
    path = teacher_file(cfg)
    model = make_model(cfg.model)
    state = load_final(path, model, teacher_meta(cfg))
    if state["step"] < state["config"]["steps"]:
        raise RuntimeError(f"{path}: the teacher run stopped at step {state['step']} of "
                           f"{state['config']['steps']}: finish the cifar10_teacher stage first")
    stamp = path.parent / STAMP
    identity = {"run": json.loads(stamp.read_text()) if stamp.is_file() else None, "step": state["step"]}
    return model.to(cfg.device if device is None else device).eval().requires_grad_(False), identity


def teacher_trained_weights(cfg: Cifar10Config) -> dict[str, torch.Tensor]:
    """The teacher's weights as trained (not averaged): the students' initial weights."""
    return verified_load(teacher_file(cfg))["trained"]


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


def student_losses(cfg: Cifar10Config, students: StudentsConfig, student: StudentSpec, teacher: UNetVelocity,
                   images: torch.Tensor | None, bank: tuple[torch.Tensor, torch.Tensor] | None):
    """One student's loss builder, by its method's pairing: ``teacher_pairs`` reads rows of the pair
    ``bank`` ``(x0, x1)`` (held on the CPU), ``windows`` training ``images`` and the teacher's
    window solve; plus the MA term (its finite-difference passes in float32 with TF32 off)."""
    pairing = student.record.pairing
    if pairing not in ("teacher_pairs", "windows"):
        raise NotImplementedError(f"the CIFAR-10 tier has no builder for pairing {pairing!r}")
    ma = student.ma_config(students.ma)
    score = VelocityTeacher(teacher, students.t_max) if ma is not None else None
    sampler = (PeRFlowSampler.from_config(TimeWindows(student.windows), teacher, students.perflow)
               if pairing == "windows" else None)

    def build(accelerator, model, plan):
        fd = ma is not None and ma.divergence == "hutchinson_fd"
        loss = CifarLoss(score, ma, student.record.distance, "tm",
                         (lambda: float32_passes(accelerator, model)) if fd else None)

        def micro_loss(step: int, micro: int):
            positions = plan.positions(step, micro, accelerator.process_index)
            probes = (ma.probe_kind if ma is not None and ma.weight > 0 and step % ma.every == 0
                      and ma.divergence != "exact" and ma.logdet == "continuous" else None)
            draws = draw_samples(plan.generators(step, positions), (CHANNELS, SIZE, SIZE),
                                 ma.n_probes if ma is not None else 0, probes)
            rows = plan.items(positions)
            if pairing == "teacher_pairs":
                x0, x1 = bank[0][rows].to(accelerator.device), bank[1][rows].to(accelerator.device)
                wb = straight_batch(x0, x1, draws.u)
            else:
                x1 = image_batch(images, rows, draws.flip if cfg.data.hflip else None, accelerator.device)
                wb = perflow_batch(sampler, x1, draws.u, draws.noise)
            with accelerator.autocast():
                return loss(model, wb, step, draws.probes)

        return micro_loss

    return build


def student_fingerprint(cfg: Cifar10Config, students: StudentsConfig, pairs: ReflowPairConfig,
                        student: StudentSpec, seed: int, teacher_identity: dict) -> dict:
    """Everything a student run depends on: only its own pairing's settings, MA only with MA."""
    stamp = {"teacher": teacher_identity, "model": asdict(students.student_unet(cfg.model)), "seed": seed,
             "student": {k: v for k, v in asdict(student).items() if k != "seeds"},
             "train": asdict(students.train_config()), "accelerate": students.computation(),
             "code": code_digest(student)}
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
    from accelerate import PartialState

    cfg: Cifar10Config = configs["cifar10"]
    pairs: ReflowPairConfig = configs["cifar10_pairs"]
    students: StudentsConfig = configs["cifar10_students"]
    process = PartialState(cpu=cfg.device == "cpu")
    teacher, identity = load_teacher(cfg, process.device)
    initial = teacher_trained_weights(cfg)
    unet = students.student_unet(cfg.model)
    pairings = {s.record.pairing for s in students.students.values()}
    images = train_images(cfg) if "windows" in pairings else None
    bank = None
    if "teacher_pairs" in pairings:
        with process.main_process_first():  # the main process generates missing shards, then all load
            bank = load_pairs(pair_bank(cfg, pairs, teacher, identity, progress and process.is_main_process))

    def build() -> UNetVelocity:
        model = make_model(unet)
        model.load_state_dict(initial)  # students start from the teacher's trained weights
        return model

    out: dict[str, dict] = {}
    for name, seed in students.runs():
        student = students.students[name]
        run = Run(student_dir(cfg, name, seed), student_fingerprint(cfg, students, pairs, student, seed, identity),
                  "cifar10_students", students, seed, student_meta(unet, name, seed, student),
                  f"cifar10 {name} seed {seed}")
        n_items = len(bank[0]) if student.record.pairing == "teacher_pairs" else len(images)
        out.setdefault(name, {})[f"seed{seed}"] = train_run(
            run, build, n_items, student_losses(cfg, students, student, teacher, images, bank), cfg.device, progress)
    return out


def load_student(cfg: Cifar10Config, students: StudentsConfig, name: str, seed: int) -> UNetVelocity:
    """A trained student's EMA weights, in eval mode on ``cfg.device``."""
    path = student_dir(cfg, name, seed) / FINAL
    if not path.is_file():
        raise FileNotFoundError(f"no student weights {path}: run (or finish) the cifar10_students stage first")
    student = students.students[name]
    check_run_dir(path.parent, {"student": {k: v for k, v in asdict(student).items() if k != "seeds"},
                                "seed": seed, "train": asdict(students.train_config()),
                                "accelerate": students.computation(),
                                "model": asdict(students.student_unet(cfg.model)), "code": code_digest(student)},
                  "rerun the cifar10_students stage first")
    unet = students.student_unet(cfg.model)
    model = make_model(unet)
    load_final(path, model, student_meta(unet, name, seed, student))
    return model.to(cfg.device).eval()
