"""Trajectory matching under-determines the marginal (docs/method.md, section 3), on the exact tier.

1. An analytic construction. ``T`` is the exact teacher map (noise to data), computed with its
   log-determinant by log-density tracking. The *rotated* student ``x0 -> T(R x0)`` has exactly the
   teacher's marginal (``R x0 ~ N(0, I)``) and misses every pairing; the *shifted* student
   ``x0 -> T(x0) + c`` has ``|c|^2`` equal to the rotated student's matching error. Same matching
   error ``E|S(x0) - T(x0)|^2``, completely different KL.
2. Trained snapshots: every kept training snapshot scored on one trajectory-matching batch (so
   differences between snapshots are paired) and on the exact KL of its few-step sampler; the pair
   with statistically equal TM loss and the largest KL ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from marflow_core import (
    GaussianMixtureTeacher,
    flow_with_logdet,
    trajectory_matching_loss,
    uniform_grid,
)

from ..common.headline import check_finite
from ..common.stats import Estimate, mc_mean, paired_difference, standard_normal_log_prob
from .config import EvalConfig, Toy2DConfig, TrainStageConfig, UnderdeterminationConfig
from .evaluate import eval_noise, tm_eval_batch
from .metrics import kl_tv, sampler_densities
from .tier import load_student

TEACHER, ROTATED, SHIFTED = "teacher T", "rotated T(R x0)", "shifted T(x0) + c"


@dataclass
class AnalyticStudent:
    """A constructed student: its samples ``y: (n, 2)``, matching error, and exact KL / TV."""

    name: str
    samples: torch.Tensor
    matching_error: float
    kl: Estimate
    tv: Estimate


@dataclass
class AnalyticConstruction:
    rotation_degrees: float
    shift: list[float]
    students: list[AnalyticStudent]  # teacher, rotated, shifted

    def by_name(self, name: str) -> AnalyticStudent:
        return next(s for s in self.students if s.name == name)


def rotation_matrix(degrees: float, like: torch.Tensor) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=like.dtype,
                        device=like.device)


def analytic_construction(
    teacher: GaussianMixtureTeacher, x0: torch.Tensor, rotation_degrees: float, teacher_steps: int
) -> AnalyticConstruction:
    """The three students of the construction from the same noise ``x0: (n, 2)``.

    ``log q`` at each student's samples by the change of variables (``|det R| = 1``; a shift has
    Jacobian ``I``); the teacher map's log-det by RK4 log-density tracking with the exact divergence.
    """
    grid = uniform_grid(0.0, 1.0, teacher_steps, x0)

    def teacher_map(x):
        flow = flow_with_logdet(teacher, x, grid, "rk4", "exact")
        return flow.x, flow.logdet

    y_teacher, logdet_teacher = teacher_map(x0)
    x_rot = x0 @ rotation_matrix(rotation_degrees, x0).T
    y_rotated, logdet_rotated = teacher_map(x_rot)
    mse_rotated = float((y_rotated - y_teacher).pow(2).sum(-1).mean())
    shift = torch.zeros_like(x0[0])
    shift[0] = math.sqrt(mse_rotated)
    students = []
    for name, y, log_q in (
        (TEACHER, y_teacher, standard_normal_log_prob(x0) - logdet_teacher),
        (ROTATED, y_rotated, standard_normal_log_prob(x_rot) - logdet_rotated),
        (SHIFTED, y_teacher + shift, standard_normal_log_prob(x0) - logdet_teacher),
    ):
        div = kl_tv(log_q, teacher.log_prob(y, 1.0))
        students.append(AnalyticStudent(name, y, float((y - y_teacher).pow(2).sum(-1).mean()),
                                        div["kl"], div["tv"]))
    return AnalyticConstruction(rotation_degrees, shift.tolist(), students)


@dataclass
class SnapshotScore:
    """One training snapshot: TM loss on the shared batch (per-sample values kept for pairing) and
    the exact KL of its ``nfe``-step sampler (``folded``: fraction of samples where a step folds)."""

    student: str
    method: str
    windows: int
    step: int
    tm: Estimate
    kl: Estimate
    folded: float
    tm_per_sample: torch.Tensor

    def as_row(self) -> dict[str, object]:
        return {"student": self.student, "step": self.step, "tm_loss": self.tm.value,
                "tm_loss_se": self.tm.stderr, "kl": self.kl.value, "kl_se": self.kl.stderr,
                "folded": self.folded}


def score_snapshots(
    teacher: GaussianMixtureTeacher, train_cfg: TrainStageConfig, toy: Toy2DConfig, eval_cfg: EvalConfig,
    cfg: UnderdeterminationConfig, checkpoint_root: Path,
) -> list[SnapshotScore]:
    """Every ``step_*.pt`` snapshot of ``cfg.students``, in step order."""
    device = toy.device
    x0 = eval_noise(eval_cfg, cfg.n_samples, device)
    batches = {}  # one shared TM batch per (pairing, K): differences between snapshots are paired
    scores = []
    for name in cfg.students:
        for path in sorted((checkpoint_root / name).glob("step_*.pt")):
            student = load_student(name, train_cfg, toy, checkpoint_root, path.name)
            dens = sampler_densities(student.model, student.windows, cfg.nfe, x0, teacher)
            key = (student.config.record.pairing, student.windows.n_windows)
            if key not in batches:
                batches[key] = tm_eval_batch(key[0], student.windows, teacher, eval_cfg)
            with torch.no_grad():
                per_sample = trajectory_matching_loss(student.model, batches[key], per_sample=True)
            scores.append(SnapshotScore(
                name, student.config.method, student.windows.n_windows,
                int(path.stem.split("_")[1]), mc_mean(per_sample), kl_tv(dens.log_q, dens.log_p)["kl"],
                dens.n_folded / len(dens.y), per_sample))
    check_finite([s.as_row() for s in scores], ("tm_loss", "kl"), "underdetermination snapshots",
                 keys=("student", "step"))
    return scores


@dataclass
class ClosestPair:
    """Two snapshots whose paired TM difference is within ``within_se`` paired standard errors,
    with the largest KL ratio among such pairs."""

    a: SnapshotScore
    b: SnapshotScore
    tm_difference: Estimate  # mean(tm_a - tm_b) on the shared batch, paired standard error
    kl_ratio: float
    within_se: float

    @property
    def tm_gap_in_se(self) -> float:
        return abs(self.tm_difference.value) / self.tm_difference.stderr

    def summary(self) -> dict[str, object]:
        return {"a": self.a.as_row(), "b": self.b.as_row(), "kl_ratio": self.kl_ratio,
                "tm_difference": self.tm_difference.value,
                "tm_difference_paired_se": self.tm_difference.stderr,
                "tm_gap_in_paired_se": self.tm_gap_in_se, "within_se": self.within_se}


def closest_tm_pair(scores: list[SnapshotScore], within_se: float) -> ClosestPair | None:
    """Among pairs scored on the same batch (same method and window count) whose TM losses are
    statistically equal (paired test), the one with the largest KL ratio; None if there is none."""
    best = None
    for i, a in enumerate(scores):
        for b in scores[i + 1:]:
            if (a.method, a.windows) != (b.method, b.windows):
                continue
            diff = paired_difference(a.tm_per_sample, b.tm_per_sample)
            if abs(diff.value) > within_se * diff.stderr:
                continue
            ratio = max(a.kl.value, b.kl.value) / max(min(a.kl.value, b.kl.value), 1e-12)
            if best is None or ratio > best.kl_ratio:
                best = ClosestPair(a, b, diff, ratio, within_se)
    return best
