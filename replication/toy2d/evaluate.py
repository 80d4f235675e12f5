"""Evaluation of trained 2-D students: the metrics table at several NFE, and trajectories for plots."""

from __future__ import annotations

import math

import pandas as pd
import torch

from marflow_core import (
    GaussianMixtureTeacher,
    PeRFlowSampler,
    ReflowPairSampler,
    TimeWindows,
    derive_seed,
    odeint_fixed,
    sample_few_step,
    stream,
    trajectory_matching_loss,
    uniform_grid,
)
from marflow_core.reflow import teacher_pairs
from marflow_core.trajectory import WindowBatch

from ..common.headline import OK, check_finite
from ..common.methods import PAIRINGS
from ..common.stats import Estimate, mc_mean
from .config import EvalConfig
from .metrics import as_row, kl_tv, mmd_rbf, mode_mass, sampler_densities, sliced_wasserstein
from .tier import DIM, TrainedStudent

# Named random streams of the evaluation (children of ``toy2d_eval.seed``, see marflow_core.seeding).
NOISE, REFERENCE, REFERENCE_B, SLICED, TM_BATCH, TM_PAIRS = (
    "eval-noise", "eval-reference", "eval-reference-b", "sliced-w2", "tm-batch", "tm-pairs")


def eval_noise(cfg: EvalConfig, n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shared evaluation noise ``(n, 2)``: every student maps the same ``x0``."""
    return torch.randn(n or cfg.n_samples, DIM, generator=stream(cfg.seed, NOISE)).to(device)


def reference_samples(teacher: GaussianMixtureTeacher, cfg: EvalConfig, name: str = REFERENCE):
    """``(n_samples, 2)`` exact teacher samples of stream ``name``."""
    return teacher.sample(cfg.n_samples, 1.0, stream(cfg.seed, name))


@torch.no_grad()
def tm_eval_batch(
    pairing: str, windows: TimeWindows, teacher: GaussianMixtureTeacher, cfg: EvalConfig
) -> WindowBatch:
    """The fresh window batch on which every student of a method ``pairing`` with these windows is
    scored (``replication.common.methods``).

    Teacher pairs: pairs from noise; windows: online window starts from noised data; both with a
    fine (``cfg.teacher_steps`` RK4) teacher solve. Every student of one pairing and window count
    sees the same batch, so differences between students are paired.
    """
    gen = stream(cfg.seed, TM_BATCH)
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing = {pairing!r}: unknown; known: {PAIRINGS}")
    if pairing == "teacher_pairs":
        x0, x1 = teacher_pairs(teacher, cfg.tm_eval_batch, (DIM,), derive_seed(cfg.seed, TM_PAIRS),
                               cfg.teacher_steps, device=teacher.means.device)
        return ReflowPairSampler(x0, x1, cfg.tm_eval_batch)(None, gen)
    sampler = PeRFlowSampler(windows, teacher, cfg.teacher_steps, "rk4", "noised_data")
    return sampler(teacher.sample(cfg.tm_eval_batch, 1.0, gen), gen)


@torch.no_grad()
def tm_losses(student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: EvalConfig) -> torch.Tensor:
    """``(tm_eval_batch,)`` per-sample trajectory-matching losses on the student's evaluation batch."""
    wb = tm_eval_batch(student.config.record.pairing, student.windows, teacher, cfg)
    return trajectory_matching_loss(student.model, wb, per_sample=True)


def tm_loss_exact_teacher(
    student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: EvalConfig
) -> Estimate:
    """``L_TM`` of a student on fresh data (never its training batches), with its MC error."""
    return mc_mean(tm_losses(student, teacher, cfg))


def evaluate_student(
    student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: EvalConfig
) -> list[dict[str, object]]:
    """One row per NFE: exact KL / TV (with MC errors), mode mass, SW, MMD, folding, TM loss."""
    x0 = eval_noise(cfg, device=teacher.means.device)
    reference = reference_samples(teacher, cfg)
    tm = tm_loss_exact_teacher(student, teacher, cfg)
    rows = []
    for nfe in cfg.nfe:
        dens = sampler_densities(student.model, student.windows, nfe, x0, teacher)
        gen = stream(cfg.seed, SLICED)
        modes = mode_mass(dens.y, teacher)
        m = cfg.mmd_samples
        divergences = kl_tv(dens.log_q, dens.log_p)
        rows.append(as_row(
            student=student.name, method=student.config.method, windows=student.windows.n_windows,
            ma=student.config.ma, nfe=nfe, **divergences, status=density_status(divergences, dens.n_folded),
            folded=dens.n_folded / cfg.n_samples, crosses_windows=nfe < student.windows.n_windows,
            mode_mass_error=modes["mass_error"], off_mode=modes["off_mode"],
            off_mode_se=modes["off_mode_se"],
            sliced_w2=sliced_wasserstein(dens.y, reference, cfg.sw_projections, gen),
            mmd2=mmd_rbf(dens.y[:m], reference[:m]), tm_loss=tm,
        ))
    check_finite(rows, HEADLINE, "fig1 table")
    return rows


#: the columns of a student row that must be finite numbers (``headline.check_finite``)
HEADLINE = ("kl", "tv", "mode_mass_error", "off_mode", "sliced_w2", "mmd2", "tm_loss")


def density_status(divergences: dict[str, float], n_folded: int) -> str:
    """``ok``, or why the row's KL is not a number: the map folded (``det(I + hJ) = 0`` on some
    samples, where ``log q`` is undefined) -- an expected failure of the method, said in words."""
    if n_folded > 0 and not all(math.isfinite(v.value) for v in divergences.values()):
        return "folded map: log q undefined where det(I + hJ) = 0"
    return OK


def reference_floor(teacher: GaussianMixtureTeacher, cfg: EvalConfig) -> dict[str, float]:
    """SW and MMD between two independent exact teacher sample sets: the metrics' noise floor."""
    a, b = reference_samples(teacher, cfg), reference_samples(teacher, cfg, REFERENCE_B)
    gen = stream(cfg.seed, SLICED)
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


def density_grid(teacher: GaussianMixtureTeacher, n: int = 200, margin_stds: float = 4.0):
    """``(gx, gy, density, lim)``: the exact ``p_1`` on an ``n x n`` grid over ``[-lim, lim]^2``."""
    lim = float(teacher.means.abs().max() + margin_stds * teacher.stds.max())
    axis = torch.linspace(-lim, lim, n, dtype=teacher.means.dtype)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([gx.flatten(), gy.flatten()], 1).to(teacher.means.device)
    density = teacher.log_prob(points, 1.0).exp().reshape(n, n).cpu()
    return gx, gy, density, lim


@torch.no_grad()
def teacher_paths(teacher: GaussianMixtureTeacher, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """``(steps + 1, B, 2)`` states of the exact teacher ODE (RK4)."""
    _, path = odeint_fixed(teacher, x0, uniform_grid(0.0, 1.0, steps, x0), "rk4", return_path=True)
    return torch.stack(path)
