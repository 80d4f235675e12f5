"""Marginal-alignment (MA) regularizer, docs/method.md, section 4 (a reconstruction, checked numerically).

Per window ``k`` the student map ``Phi^theta_k`` (``n`` sub-steps of the student ODE) pushes the
teacher marginal ``p^T_{t_k}`` to ``q_{k+1}``; the regularizer is ``R_k = KL(q_{k+1} || p^T_{t_{k+1}})``.

* Training surrogate (B): ``L_MA,k = E_x[-int div v_theta ds - <stopgrad(s_T(y, t_{k+1})), y>]``,
  whose gradient equals ``grad_theta R_k`` (the tracked log-determinant stands in for the unknown
  student score; the frozen teacher supplies ``s_T``).
* Value estimator (A): with ``delta = v_theta - v_T`` along the student path,
  ``R_k = E int [-div delta(x_s, s) - s_T(x_s, s) . delta(x_s, s)] ds`` (``dKL/ds`` by parts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .divergence import DIVERGENCE_KINDS, PROBE_KINDS, DivergenceFn, divergence_fn
from .errors import InvalidParameter
from .logdensity import euler_map_with_logdet, flow_with_logdet
from .models import VelocityField
from .solvers import FIXED_METHODS, odeint_fixed, uniform_grid
from .teachers import Teacher
from .trajectory import WindowBatch

LOGDET_MODES: tuple[str, ...] = ("continuous", "discrete")


@dataclass
class MAConfig:
    """Parameters of the MA term; all unknown in the paper, so all exposed.

    ``weight`` is ``lambda``; ``substeps`` the student sub-steps ``n`` per window; ``window_weights``
    optional per-window multipliers (length ``K``); ``every`` runs the term on every ``every``-th step.
    ``logdet``: ``"continuous"`` tracks ``int div v`` (docs/method.md; exact or Hutchinson divergence, any
    dimension) and is exact only as ``n`` grows; ``"discrete"`` uses the exact ``log|det(I + h J)|`` of
    the ``n`` Euler sub-steps (low dimension only), so the surrogate's gradient is that of the KL of the
    student's actual few-step window map.
    ``divergence``: ``"exact"``, ``"hutchinson"`` (VJP; its parameter gradient is a double backward)
    or ``"hutchinson_fd"`` (forward differences with step ``fd_step``, bias ``O(fd_step)``, first-order
    backward only, so it works through any attention kernel).
    ``batch_fraction`` < 1 evaluates the term on the first ``ceil(fraction * B)`` rows of the window
    batch only (rows are independent draws, so this is an unbiased estimate of the same expectation
    with more variance, at a fraction of the cost).
    The ``t_max`` cutoff belongs to the teacher's score (``VelocityTeacher``).
    """

    weight: float = 0.1
    substeps: int = 2
    solver: str = "euler"
    divergence: str = "exact"
    n_probes: int = 1
    probe_kind: str = "rademacher"
    normalize_by_dim: bool = True
    window_weights: list[float] | None = field(default=None)
    every: int = 1
    logdet: str = "continuous"
    fd_step: float = 1e-3
    batch_fraction: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            ("weight", self.weight, self.weight >= 0, "lambda must be >= 0"),
            ("substeps", self.substeps, self.substeps >= 1, "must be >= 1"),
            ("solver", self.solver, self.solver in FIXED_METHODS, f"one of {FIXED_METHODS}"),
            ("divergence", self.divergence, self.divergence in DIVERGENCE_KINDS,
             f"one of {DIVERGENCE_KINDS}"),
            ("n_probes", self.n_probes, self.n_probes >= 1, "must be >= 1"),
            ("probe_kind", self.probe_kind, self.probe_kind in PROBE_KINDS, f"one of {PROBE_KINDS}"),
            ("every", self.every, self.every >= 1, "must be >= 1"),
            ("logdet", self.logdet, self.logdet in LOGDET_MODES, f"one of {LOGDET_MODES}"),
            ("fd_step", self.fd_step, self.fd_step > 0, "must be > 0"),
            ("batch_fraction", self.batch_fraction, 0 < self.batch_fraction <= 1, "must lie in (0, 1]"),
        ]
        if self.logdet == "discrete":
            checks.append(("solver", self.solver, self.solver == "euler",
                           "the discrete log-det is exact for Euler sub-steps only"))
        if self.window_weights is not None:
            checks.append(("window_weights", self.window_weights,
                           all(w >= 0 for w in self.window_weights), "weights must be >= 0"))
        for key, value, ok, why in checks:
            if not ok:
                raise InvalidParameter(key, value, why)

    def inactive_fields(self) -> dict[str, str]:
        """Fields that have no effect given the others: ``{name: reason}``."""
        if self.logdet == "discrete":
            why = "logdet = 'discrete' uses the exact Jacobian log-det, no divergence estimate"
            return dict.fromkeys(("divergence", "n_probes", "probe_kind", "fd_step"), why)
        unused = {}
        if self.divergence == "exact":
            unused = dict.fromkeys(("n_probes", "probe_kind"), "only Hutchinson divergence uses probes")
        if self.divergence != "hutchinson_fd":
            unused["fd_step"] = "only divergence = 'hutchinson_fd' takes a finite-difference step"
        return unused


def score_horizon(teacher: Teacher, t_end: torch.Tensor) -> torch.Tensor:
    """Where a window's MA term ends: ``t_end``, or the teacher's score cutoff ``t_max`` when its
    score is only defined below it (a learned velocity's ``(t v - x) / (1 - t)`` is 0/0 at t = 1).

    The student is integrated to this time and scored there, so that the end point and the score
    time agree: scoring a t = 1 end point with the score at 0.99 would compare the student's
    clean samples with the teacher's law at 0.99, where ``s ~ -100 x`` amplifies every error."""
    t_max = getattr(teacher, "t_max", None)
    return t_end if t_max is None else t_end.clamp(max=t_max)


def ma_surrogate(
    model: VelocityField,
    teacher: Teacher,
    wb: WindowBatch,
    config: MAConfig,
    generator: torch.Generator | None = None,
    probes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar surrogate (B) averaged over the batch: ``-L - <sg(s_T(y, t_end)), y>``, over ``d`` if normalized.

    The student runs from ``t_start`` to ``score_horizon(teacher, t_end)`` (``t_end`` unless the
    teacher's score has a cutoff below it) in ``config.substeps`` steps.

    Hutchinson probes are drawn from ``generator``, or are the given ``probes`` ``(P, B, ...)`` (one
    column per row of ``wb``; a caller that draws them per sample, e.g. for a batch split over
    processes)."""
    if config.batch_fraction < 1:
        wb = wb.head(math.ceil(config.batch_fraction * wb.x_start.shape[0]))
        if probes is not None:
            probes = probes[:, : wb.x_start.shape[0]]
    x = wb.x_start.detach()
    t_end = torch.maximum(score_horizon(teacher, wb.t_end), wb.t_start)
    grid = uniform_grid(wb.t_start, t_end, config.substeps, x)
    if config.logdet == "discrete":
        flow = euler_map_with_logdet(model, x, grid, create_graph=True)
    else:
        flow = flow_with_logdet(
            model, x, grid, config.solver, config.divergence, config.n_probes, config.probe_kind,
            create_graph=True, generator=generator, fd_step=config.fd_step, probes=probes,
        )
    with torch.no_grad():
        score = teacher.score(flow.x.detach(), t_end)
    per_sample = -flow.logdet - (score * flow.x).flatten(1).sum(-1)
    if config.window_weights is not None:
        w = torch.as_tensor(config.window_weights, dtype=x.dtype, device=x.device)
        if len(w) <= int(wb.k.max()):
            raise ValueError(f"window_weights has {len(w)} entries, window {int(wb.k.max())} seen")
        per_sample = per_sample * w[wb.k]
    loss = per_sample.mean()
    return loss / x[0].numel() if config.normalize_by_dim else loss


def ma_value_rate(
    model: VelocityField, teacher: Teacher, x: torch.Tensor, t: torch.Tensor, div: DivergenceFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integrand of estimator (A) at ``x: (B, ...)``, ``t: (B,)``: ``(v_theta, rate)`` with
    ``rate = -div delta - s_T . delta``, ``delta = v_theta - v_T`` (``rate: (B,)``).

    For ``x ~ q_t`` evolving under ``v_theta`` and ``p^T_t`` under ``v_T``, ``E_q[rate] =
    d/dt KL(q_t || p^T_t)`` (integrate ``E_q[delta . grad log(q / p)]`` by parts). ``div`` is a
    ``divergence_fn`` of the field ``delta`` (see ``delta_field``).
    """
    d_vel, d_div = div(x, t)
    rate = -d_div - (teacher.score(x, t) * d_vel).flatten(1).sum(-1)
    return d_vel + teacher.velocity(x, t), rate


def delta_field(model: VelocityField, teacher: Teacher) -> VelocityField:
    """``delta(x, t) = v_theta(x, t) - v_T(x, t)``."""
    return lambda x, t: model(x, t) - teacher.velocity(x, t)


@torch.no_grad()
def ma_value_estimate(
    model: VelocityField,
    teacher: Teacher,
    x_start: torch.Tensor,
    t_start: torch.Tensor | float,
    t_end: torch.Tensor | float,
    substeps: int = 32,
    solver: str = "rk4",
    divergence: str = "exact",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    probe_kind: str = "rademacher",
) -> torch.Tensor:
    """Estimator (A): per-sample ``int [-div delta - s_T . delta] ds`` along the student path, ``(B,)``.

    ``x_start ~ p^T_{t_start}``; the batch mean estimates ``R_k`` and its spread the Monte-Carlo error.
    Hutchinson probes are drawn once and stay fixed along the path.
    """
    div = divergence_fn(delta_field(model, teacher), divergence, n_probes, probe_kind,
                        like=x_start, generator=generator)

    def dynamics(state, t):
        return ma_value_rate(model, teacher, state[0], t, div)

    grid = uniform_grid(t_start, t_end, substeps, x_start)
    zero = torch.zeros(x_start.shape[0], dtype=x_start.dtype, device=x_start.device)
    _, value = odeint_fixed(dynamics, (x_start, zero), grid, solver)
    return value
