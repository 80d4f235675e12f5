"""One CIFAR-10 training run (the teacher, or one student seed) on the GPU tiers' accelerate loop
(``replication.gpu_common.accelerate_train``), from one CPU process to many GPUs (``accelerate launch``).

The run folder (``prepare_run_dir``: kept only for the same fingerprint) holds
``checkpoints/checkpoint-<step>/`` (accelerate ``save_state``: weights, Adam, EMA, RNG states, step;
the newest is resumed), ``train_log.jsonl`` and, once the run is finished, ``final.pt``: a core
checkpoint file (content digest, ``meta``, read by ``marflow_core.load_checkpoint``) whose ``model``
is the EMA of the weights (the weights themselves with ``ema_decay: 0``) and ``trained`` the weights
as trained. A finished run is not trained again.

``batch_size`` is the global batch: each process computes ``batch_size / (processes x grad_accum)``
samples per micro-step, at the global positions of the shared batch plan (tag ``cifar10``), each with
its own random stream (``objective.draw_samples``). The initial weights are drawn from ``seed`` in
every process; dropout draws from the global generator, seeded per process
(``stream cifar10-dropout/<rank>``) and restored with the checkpoint on resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marflow_core import load_checkpoint
from marflow_core.atomic import atomic_torch_save
from marflow_core.integrity import verified_load, with_digest
from marflow_core.seeding import derive_seed
from marflow_core.training import canonical

from ..common.runs import prepare_run_dir
from ..config import require
from ..gpu_common.accelerate_train import LOG, LoopSettings, make_accelerator, prepare, train_loop
from ..gpu_common.batches import BatchPlan
from ..gpu_common.ema import WeightEMA
from .config import StudentsConfig, TeacherConfig

FINAL = "final.pt"
TAG = "cifar10"

#: ``(accelerator, prepared model, plan) -> micro_loss``: a run's loss, given where it runs
LossBuilder = Callable[[Any, nn.Module, BatchPlan], Callable[[int, int], tuple[torch.Tensor, dict[str, float]]]]


@dataclass
class Run:
    """One training run: its folder and fingerprint, its section (``cifar10_teacher`` or
    ``cifar10_students``, for messages) and config, seed, checkpoint ``meta`` and progress label."""

    run_dir: Path
    fingerprint: dict
    section: str
    cfg: TeacherConfig | StudentsConfig
    seed: int
    meta: dict
    desc: str


def per_process_batch(batch_size: int, processes: int, grad_accum: int, where: str) -> int:
    """The micro-batch of one process: the global ``batch_size`` over ``processes x grad_accum``."""
    parts = processes * grad_accum
    require(batch_size % parts == 0, f"{where}.batch_size", batch_size,
            f"the global batch must split evenly over {processes} process(es) x grad_accum {grad_accum}")
    return batch_size // parts


def settings(run: Run) -> LoopSettings:
    cfg = run.cfg
    return LoopSettings(steps=cfg.steps, lr_at=cfg.lr_at, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                        loss_limit=cfg.loss_limit, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                        checkpoints_total_limit=cfg.checkpoints_total_limit,
                        max_overflow_skips=cfg.max_overflow_skips, desc=run.desc)


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finished(run: Run) -> dict | None:
    """The saved final file of a finished run (its digest checked), or None."""
    path = run.run_dir / FINAL
    if not path.is_file():
        return None
    state = verified_load(path)
    return state if state.get("step") == run.cfg.steps else None


def train_run(run: Run, build_model: Callable[[], nn.Module], n_items: int, losses: LossBuilder, device: str,
              progress: bool = True) -> dict:
    """Train (or resume, or skip when finished) ``run``; returns ``{"steps", "last"}`` (the last
    logged row). ``build_model()`` makes the initial model on the CPU (the global generator seeded
    with ``run.seed``); ``n_items`` is the size of the data the plan indexes."""
    cfg = run.cfg
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum, run.run_dir, cpu=device == "cpu")
    micro = per_process_batch(cfg.batch_size, accelerator.num_processes, cfg.grad_accum, run.section)
    if accelerator.is_main_process:
        prepare_run_dir(run.run_dir, run.fingerprint)
    accelerator.wait_for_everyone()
    done = finished(run)
    if done is not None:
        return {"steps": done["step"], "last": done["history"][-1] if done["history"] else {}}

    torch.manual_seed(run.seed)  # the same initial weights in every process
    model = build_model().to(accelerator.device)
    model.train()
    ema = WeightEMA(model.parameters(), cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = cfg.make_optimizer(model.parameters())
    model, optimizer, state = prepare(accelerator, model, optimizer, ema, run.run_dir)
    if state.step == 0:  # a resume has its RNG states back from the checkpoint
        torch.manual_seed(derive_seed(run.seed, f"{TAG}-dropout", accelerator.process_index))
    plan = BatchPlan(n_items, micro, accelerator.num_processes, cfg.grad_accum, run.seed, TAG)
    train_loop(accelerator, model, optimizer, ema, state, settings(run), run.run_dir,
               losses(accelerator, model, plan), progress)

    if accelerator.is_main_process:
        save_final(run, accelerator.unwrap_model(model), ema, state.step)
    accelerator.wait_for_everyone()
    history = read_log(run.run_dir)
    return {"steps": state.step, "last": history[-1] if history else {}}


def save_final(run: Run, model: nn.Module, ema: WeightEMA | None, step: int) -> None:
    """``final.pt``: the EMA weights as ``model`` (core checkpoint format), the trained ones as
    ``trained``, with the log and the run's settings."""
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ema is None:
        averaged = trained
    else:
        with ema.averaged(model.parameters()):
            averaged = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state = {"model": averaged, "trained": trained, "step": step, "history": read_log(run.run_dir),
             "config": asdict(run.cfg.train_config()), "accelerate": run.cfg.computation(), "seed": run.seed,
             "meta": run.meta, "ema_updates": ema.num_updates if ema is not None else 0}
    atomic_torch_save(canonical(with_digest(state)), run.run_dir / FINAL)


def load_final(path: Path, model: nn.Module, meta: dict, trained: bool = False) -> dict:
    """Load ``final.pt`` into ``model``: the EMA weights (``trained``: the weights as trained); the
    digest, finiteness and ``meta`` checked (``marflow_core.load_checkpoint``). Returns the file."""
    state = load_checkpoint(path, model, meta)
    if trained:
        model.load_state_dict(state["trained"])
    return state
