"""Log-density tracking along an ODE, and exact log-densities of few-step (discrete) maps.

Continuous flow (instantaneous change of variables): for ``dx/ds = v(x, s)`` from ``x`` at ``t_a``
to ``y`` at ``t_b``, ``log q(y) = log p(x) - int_{t_a}^{t_b} div v(x_s, s) ds``. The augmented state
``(x, L)`` with ``dL/ds = div v`` is solved by any fixed-grid solver, so ``L = log|det dPhi/dx|``.

Discrete map: a few-step Euler sampler ``x_{n+1} = x_n + h_n v(x_n, t_n)`` is a composition of maps
whose Jacobians ``I + h_n dv/dx`` are exact, so ``log|det|`` of the whole map is exact too (cheap for
low dimension); negative or zero determinants mean the step folds space and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .divergence import batch_jacobian, divergence_fn
from .errors import require_finite
from .models import VelocityField
from .solvers import batch_grid, odeint_fixed


@dataclass
class FlowWithLogDet:
    """End points ``x: (B, ...)`` and ``logdet: (B,)`` = ``log|det dPhi/dx|`` of the map."""

    x: torch.Tensor
    logdet: torch.Tensor
    n_folded: int = 0  # discrete maps only: samples where some step had det <= 0

    @property
    def delta_log_density(self) -> torch.Tensor:
        """``log q(y) - log p(x) = -logdet``."""
        return -self.logdet


def flow_with_logdet(
    field: VelocityField,
    x0: torch.Tensor,
    t_grid: torch.Tensor,
    method: str = "euler",
    divergence: str = "exact",
    n_probes: int = 1,
    probe_kind: str = "rademacher",
    create_graph: bool = False,
    generator: torch.Generator | None = None,
    fd_step: float = 1e-3,
    probes: torch.Tensor | None = None,
    jacobian_method: str | None = None,
) -> FlowWithLogDet:
    """Solve the augmented ODE ``d(x, L)/ds = (v, div v)`` over ``t_grid`` (``(n+1,)`` or ``(n+1, B)``).

    Probes (Hutchinson) stay fixed over the solve; ``probes`` ``(P, B, ...)``, when given, are used
    instead of drawing them from ``generator``. With ``create_graph`` the result is differentiable
    in the field's parameters (training); otherwise it is detached step by step (evaluation).
    ``jacobian_method``: how the exact divergence is computed (``divergence.batch_jacobian``).
    """
    div = divergence_fn(field, divergence, n_probes, probe_kind, create_graph, x0, generator, fd_step,
                        probes, jacobian_method)

    def dynamics(state, t):
        return div(state[0], t)

    start = x0 if create_graph else x0.detach()
    logdet0 = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    x, logdet = odeint_fixed(dynamics, (start, logdet0), t_grid, method)
    return FlowWithLogDet(x, logdet)


def euler_map_with_logdet(
    field: VelocityField, x0: torch.Tensor, t_grid: torch.Tensor, create_graph: bool = False,
    jacobian_method: str | None = None,
) -> FlowWithLogDet:
    """Exact ``log|det|`` of the Euler map over ``t_grid`` (``(n+1,)`` or ``(n+1, B)``; low dimension).

    Per step ``x <- x + h v(x, t)`` the Jacobian is ``I + h J_v``; ``logdet = sum_n log|det(I + h_n J_n)|``.
    Where a step folds space (``det <= 0``) the map is not injective and ``log q = log p - logdet``
    keeps one preimage only: a lower bound on the true ``log q``. ``create_graph`` keeps it differentiable.
    ``jacobian_method``: how ``J_n`` is computed (``divergence.batch_jacobian``; None: the default).
    """
    grid = batch_grid(t_grid, x0.shape[0])
    x = x0 if create_graph else x0.detach()
    dim = x[0].numel()
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    folded = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(grid.shape[0] - 1):
        h = grid[i + 1] - grid[i]
        v, jac = batch_jacobian(field, x, grid[i], create_graph, jacobian_method)
        sign, logabs = torch.linalg.slogdet(eye + h[:, None, None] * jac)
        logdet = logdet + logabs
        folded |= sign.detach() <= 0
        x = x + h.reshape(-1, *([1] * (x.ndim - 1))) * v
        require_finite(x.detach(), f"Euler map, step {i + 1} of {grid.shape[0] - 1}")
        require_finite(torch.where(sign.detach() == 0, 0.0, logabs.detach()),
                       f"Euler map log|det|, step {i + 1}")
    return FlowWithLogDet(x, logdet, int(folded.sum()))
