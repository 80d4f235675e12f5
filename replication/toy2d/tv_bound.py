"""The telescoping total-variation bound (docs/method.md, section 5), every term on the exact tier.

With ``Q_k`` the student's marginal after ``k`` windows from ``Q_0 = P_0 = N(0, I)`` and
``P_k = p^T_{t_k}``: ``TV(Q_K, P_K) <= sum_k TV(q_{k+1}, P_{k+1}) <= sum_k sqrt(R_k / 2)``, where
``q_{k+1}`` is the student's window map applied to the teacher's ``P_k`` and ``R_k = KL(q_{k+1} ||
P_{k+1})``. Terms are computed for the few-step sampler (exact change of variables, lower bounds where
a step folds) and for the student ODE (``R_k`` from the MA value estimator (A); the exact local KL
and final TV of a fine Euler discretisation beside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from marflow_core import GaussianMixtureTeacher, ma_value_estimate, stream

from ..common.stats import Estimate, mc_mean
from .config import TVBoundConfig
from .metrics import kl_tv, sampler_densities, window_densities
from .tier import DIM, TrainedStudent

WINDOW_START, FINAL_NOISE = "window-start", "eval-noise"
#: an inequality between two Monte-Carlo estimates holds if ``lhs <= rhs + SLACK_SE * hypot(SEs)``
SLACK_SE = 2.0


@dataclass
class WindowTerms:
    """Window ``k = [t_start, t_end]``: the sampler's local TV / KL (``local_folded`` = fraction of
    folding samples), the fine Euler map's local KL, and estimator (A)'s ``R_k`` of the student ODE."""

    window: int
    t_start: float
    t_end: float
    local_tv: Estimate
    local_kl: Estimate
    local_folded: float
    ode_local_kl: Estimate
    r_k: Estimate


@dataclass
class BoundCheck:
    """``lhs <= rhs`` up to ``slack`` (``SLACK_SE`` combined standard errors of the estimates)."""

    name: str
    lhs: float
    rhs: float
    slack: float

    @property
    def holds(self) -> bool:
        return self.lhs <= self.rhs + self.slack


@dataclass
class TVBound:
    """Every term of the bound for one student, and the inequalities checked between them."""

    student: str
    windows: list[WindowTerms]
    final_tv: Estimate  # TV(Q_K, P_K) of the few-step sampler
    sum_local_tv: Estimate
    pinsker_local_kl: Estimate  # sum_k sqrt(KL_k / 2), sampler
    ode_final_tv: Estimate  # TV(Q_K, P_K) of the fine Euler map of the student ODE
    pinsker_estimator_a: Estimate  # sum_k sqrt(R_k / 2), student ODE

    @property
    def checks(self) -> list[BoundCheck]:
        def check(name: str, lhs: Estimate, rhs: Estimate) -> BoundCheck:
            return BoundCheck(name, lhs.value, rhs.value, SLACK_SE * math.hypot(lhs.stderr, rhs.stderr))

        return [
            check("sampler: TV(Q_K,P_K) <= sum local TV", self.final_tv, self.sum_local_tv),
            check("sampler: sum local TV <= sum sqrt(KL_k/2)", self.sum_local_tv, self.pinsker_local_kl),
            check("ODE: TV(Q_K,P_K) <= sum sqrt(R_k/2)", self.ode_final_tv, self.pinsker_estimator_a),
        ]


def pinsker_term(kl: Estimate) -> Estimate:
    """``sqrt(max(KL, 0) / 2)`` (a Monte-Carlo KL can dip below 0); its error is the change of that
    monotone function over one standard error upward, a conservative delta method that stays finite
    at ``KL = 0``."""
    value = math.sqrt(max(kl.value, 0.0) / 2)
    return Estimate(value, math.sqrt(max(kl.value + kl.stderr, 0.0) / 2) - value)


def sum_estimates(terms: list[Estimate]) -> Estimate:
    """The sum of independent estimates; standard errors add in quadrature."""
    return Estimate(sum(e.value for e in terms), math.sqrt(sum(e.stderr**2 for e in terms)))


def pinsker_sum(kls: list[Estimate]) -> Estimate:
    """``sum_k sqrt(max(KL_k, 0) / 2)`` with its standard error (windows are independent)."""
    return sum_estimates([pinsker_term(kl) for kl in kls])


def window_terms(
    student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: TVBoundConfig, seed: int, k: int
) -> WindowTerms:
    """All terms of window ``k``; the three estimates share their start samples ``x ~ P_k``."""
    bounds = student.windows.boundaries().tolist()
    ta, tb = bounds[k], bounds[k + 1]
    local = window_densities(student.model, teacher, ta, tb, cfg.steps_per_window, cfg.n_samples,
                             stream(seed, WINDOW_START, k))
    fine = window_densities(student.model, teacher, ta, tb, cfg.ode_euler_steps, cfg.n_samples,
                            stream(seed, WINDOW_START, k))
    x_start = teacher.sample(cfg.n_samples, ta, stream(seed, WINDOW_START, k))
    r_k = ma_value_estimate(student.model, teacher, x_start, ta, tb, substeps=cfg.ode_substeps,
                            solver="rk4")
    div, div_fine = kl_tv(local.log_q, local.log_p), kl_tv(fine.log_q, fine.log_p)
    return WindowTerms(k, ta, tb, div["tv"], div["kl"], local.n_folded / cfg.n_samples, div_fine["kl"],
                       mc_mean(r_k))


def tv_bound(
    student: TrainedStudent, teacher: GaussianMixtureTeacher, cfg: TVBoundConfig, seed: int
) -> TVBound:
    """The bound's terms for ``student``; ``seed`` is the evaluation root seed (``toy2d_eval.seed``)."""
    windows = [window_terms(student, teacher, cfg, seed, k) for k in range(student.windows.n_windows)]
    x0 = torch.randn(cfg.n_samples, DIM, generator=stream(seed, FINAL_NOISE)).to(teacher.means.device)
    n_windows = student.windows.n_windows

    def final_tv(steps_per_window: int) -> Estimate:
        dens = sampler_densities(student.model, student.windows, steps_per_window * n_windows, x0,
                                 teacher)
        return kl_tv(dens.log_q, dens.log_p)["tv"]

    return TVBound(
        student=student.name, windows=windows, final_tv=final_tv(cfg.steps_per_window),
        sum_local_tv=sum_estimates([w.local_tv for w in windows]),
        pinsker_local_kl=pinsker_sum([w.local_kl for w in windows]),
        ode_final_tv=final_tv(cfg.ode_euler_steps),
        pinsker_estimator_a=pinsker_sum([w.r_k for w in windows]),
    )
