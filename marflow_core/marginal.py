"""Marginal-alignment (MA) regularizer, METHOD.md section 4 (a reconstruction, checked numerically).

Per window ``k`` the student map ``Phi^theta_k`` (``n`` sub-steps of the student ODE) pushes the
teacher marginal ``p^T_{t_k}`` to ``q_{k+1}``; the regularizer is ``R_k = KL(q_{k+1} || p^T_{t_{k+1}})``.

* Training surrogate (B): ``L_MA,k = E_x[-int div v_theta ds - <stopgrad(s_T(y, t_{k+1})), y>]``,
  whose gradient equals ``grad_theta R_k`` (the tracked log-determinant stands in for the unknown
  student score; the frozen teacher supplies ``s_T``).
* Value estimator (A): with ``delta = v_theta - v_T`` along the student path,
  ``R_k = E int [-div delta(x_s, s) - s_T(x_s, s) . delta(x_s, s)] ds`` (``dKL/ds`` by parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .divergence import (
    PROBE_KINDS,
    Field,
    exact_divergence,
    hutchinson_divergence,
    sample_probes,
)
from .errors import InvalidParameter
from .logdensity import DIVERGENCE_KINDS, euler_map_with_logdet, flow_with_logdet
from .solvers import FIXED_METHODS, odeint_fixed, uniform_grid
from .trajectory import WindowBatch

LOGDET_MODES: tuple[str, ...] = ("continuous", "discrete")


class ScoringTeacher(Protocol):
    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@dataclass
class MAConfig:
    """Parameters of the MA term; all unknown in the paper, so all exposed.

    ``weight`` is ``lambda``; ``substeps`` the student sub-steps ``n`` per window; ``window_weights``
    optional per-window multipliers (length ``K``); ``every`` runs the term on every ``every``-th step.
    ``logdet``: ``"continuous"`` tracks ``int div v`` (METHOD.md; exact or Hutchinson divergence, any
    dimension) and is exact only as ``n`` grows; ``"discrete"`` uses the exact ``log|det(I + h J)|`` of
    the ``n`` Euler sub-steps (low dimension only), so the surrogate's gradient is that of the KL of the
    student's actual few-step window map.
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


def ma_surrogate(
    model: Field,
    teacher: ScoringTeacher,
    wb: WindowBatch,
    config: MAConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scalar surrogate (B) averaged over the batch: ``-L - <sg(s_T(y, t_end)), y>``, over ``d`` if normalized."""
    x = wb.x_start.detach()
    grid = uniform_grid(wb.t_start, wb.t_end, config.substeps, x)
    if config.logdet == "discrete":
        flow = euler_map_with_logdet(model, x, grid, create_graph=True)
    else:
        flow = flow_with_logdet(
            model, x, grid, config.solver, config.divergence, config.n_probes, config.probe_kind,
            create_graph=True, generator=generator,
        )
    with torch.no_grad():
        score = teacher.score(flow.x.detach(), wb.t_end)
    per_sample = -flow.logdet - (score * flow.x).flatten(1).sum(-1)
    if config.window_weights is not None:
        w = torch.as_tensor(config.window_weights, dtype=x.dtype, device=x.device)
        if len(w) <= int(wb.k.max()):
            raise ValueError(f"window_weights has {len(w)} entries, window {int(wb.k.max())} seen")
        per_sample = per_sample * w[wb.k]
    loss = per_sample.mean()
    return loss / x[0].numel() if config.normalize_by_dim else loss


@torch.no_grad()
def ma_value_estimate(
    model: Field,
    teacher: ScoringTeacher,
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
    """
    if divergence not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCE_KINDS}")
    probes = (sample_probes(x_start, n_probes, probe_kind, generator)
              if divergence == "hutchinson" else None)

    def delta(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t) - teacher.velocity(x, t)

    def dynamics(state, t):
        x = state[0]
        if probes is None:
            d_vel, d_div = exact_divergence(delta, x, t)
        else:
            d_vel, d_div = hutchinson_divergence(delta, x, t, probes)
        v_student = d_vel + teacher.velocity(x, t)
        rate = -d_div - (teacher.score(x, t) * d_vel).flatten(1).sum(-1)
        return v_student, rate

    grid = uniform_grid(t_start, t_end, substeps, x_start)
    zero = torch.zeros(x_start.shape[0], dtype=x_start.dtype, device=x_start.device)
    _, value = odeint_fixed(dynamics, (x_start, zero), grid, solver)
    return value
