"""Evaluation of trained 2-D students: the metrics table at several NFE, and trajectories for plots."""

from __future__ import annotations

import pandas as pd
import torch

from marflow_core import (
    GaussianMixtureTeacher,
    PeRFlowSampler,
    ReflowPairSampler,
    odeint_fixed,
    sample_few_step,
    uniform_grid,
)
from marflow_core.reflow import teacher_pairs

from .config import EvalConfig
from .metrics import (
    Estimate,
    as_row,
    eval_tm_loss,
    kl_tv,
    mmd_rbf,
    mode_mass,
    sampler_densities,
    sliced_wasserstein,
)
from .tier import DIM, TrainedStudent


def eval_noise(cfg: EvalConfig, n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shared evaluation noise ``(n, 2)``: every student maps the same ``x0``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(n or cfg.n_samples, DIM, generator=gen).to(device)


def tm_loss_exact_teacher(
    student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: EvalConfig
) -> Estimate:
    """``L_TM`` of a student on fresh data, with a fine (``cfg.teacher_steps`` RK4) teacher solve.

    Reflow students are scored on fresh teacher pairs from noise, PeRFlow students on online window
    starts from noised data: each on the objective it was trained for, never on its training batches.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if student.config.method == "reflow":
        x0, x1 = teacher_pairs(teacher, cfg.tm_eval_batch, (DIM,), cfg.seed + 2, cfg.teacher_steps,
                               device=teacher.means.device)
        sampler = ReflowPairSampler(x0, x1, cfg.tm_eval_batch)
        return eval_tm_loss(student.model, sampler, None, gen)
    sampler = PeRFlowSampler(student.windows, teacher, cfg.teacher_steps, "rk4", "noised_data")
    return eval_tm_loss(student.model, sampler, teacher.sample(cfg.tm_eval_batch, 1.0, gen), gen)


def evaluate_student(
    student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: EvalConfig
) -> list[dict[str, object]]:
    """One row per NFE: exact KL / TV (with MC errors), mode mass, SW, MMD, folding, TM loss."""
    x0 = eval_noise(cfg, device=teacher.means.device)
    reference = teacher.sample(cfg.n_samples, 1.0, torch.Generator().manual_seed(cfg.seed + 3))
    tm = tm_loss_exact_teacher(student, teacher, cfg)
    rows = []
    for nfe in cfg.nfe:
        dens = sampler_densities(student.model, student.windows, nfe, x0, teacher)
        gen = torch.Generator().manual_seed(cfg.seed + 4)
        modes = mode_mass(dens.y, teacher)
        m = cfg.mmd_samples
        rows.append(as_row(
            student=student.name, method=student.config.method, windows=student.windows.n_windows,
            ma=student.config.ma, nfe=nfe, **kl_tv(dens.log_q, dens.log_p),
            folded=dens.n_folded / cfg.n_samples, crosses_windows=nfe < student.windows.n_windows,
            mode_mass_error=modes["mass_error"], off_mode=modes["off_mode"],
            off_mode_se=modes["off_mode_se"],
            sliced_w2=sliced_wasserstein(dens.y, reference, cfg.sw_projections, gen),
            mmd2=mmd_rbf(dens.y[:m], reference[:m]), tm_loss=tm,
        ))
    return rows


def reference_floor(teacher: GaussianMixtureTeacher, cfg: EvalConfig) -> dict[str, float]:
    """SW and MMD between two independent exact teacher sample sets: the metrics' noise floor."""
    a = teacher.sample(cfg.n_samples, 1.0, torch.Generator().manual_seed(cfg.seed + 3))
    b = teacher.sample(cfg.n_samples, 1.0, torch.Generator().manual_seed(cfg.seed + 5))
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    m = cfg.mmd_samples
    return {"sliced_w2": sliced_wasserstein(b, a, cfg.sw_projections, gen), "mmd2": mmd_rbf(b[:m], a[:m]),
            **{k: v for k, v in mode_mass(b, teacher).items() if k not in ("mass", "off_mode_se")}}


def evaluate_all(
    students: dict[str, TrainedStudent], teacher: GaussianMixtureTeacher, cfg: EvalConfig
) -> pd.DataFrame:
    return pd.DataFrame([row for s in students.values() for row in evaluate_student(s, teacher, cfg)])


@torch.no_grad()
def student_paths(student: TrainedStudent, x0: torch.Tensor, nfe: int) -> torch.Tensor:
    """``(nfe + 1, B, 2)`` states of the few-step sampler."""
    _, path = sample_few_step(student.model, x0, student.windows, nfe, return_path=True)
    return torch.stack(path)


@torch.no_grad()
def teacher_paths(teacher: GaussianMixtureTeacher, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """``(steps + 1, B, 2)`` states of the exact teacher ODE (RK4)."""
    _, path = odeint_fixed(teacher, x0, uniform_grid(0.0, 1.0, steps, x0), "rk4", return_path=True)
    return torch.stack(path)
