"""Fixed-grid ODE solvers (Euler, Heun, classic RK4, Kutta's 3/8-rule RK4) and an adaptive solve.

The state is a tensor ``(B, ...)`` or a tuple of such tensors (used for the augmented
``(x, log-det)`` state). The dynamics are ``f(state, t) -> d state / dt`` with ``t: (B,)``. A time grid
is ``(n + 1,)`` (shared by the batch) or ``(n + 1, B)`` (one grid per sample, as PeRFlow needs when
every sample lives in its own window). Everything is differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

import torch

State: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]
Dynamics: TypeAlias = Callable[[State, torch.Tensor], State]
FixedMethod = Literal["euler", "heun", "rk4", "rk4_38"]
FIXED_METHODS: tuple[str, ...] = ("euler", "heun", "rk4", "rk4_38")
#: dynamics evaluations per step of each fixed-grid method
EVALS_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "rk4": 4, "rk4_38": 4}


def _batch_size(state: State) -> int:
    return (state[0] if isinstance(state, tuple) else state).shape[0]


def _axpy(x: State, h: torch.Tensor, *terms: tuple[float, State]) -> State:
    """``x + h * sum_j c_j k_j`` for tensors or tuples; ``h: (B,)`` broadcasts per sample."""

    def one(xi: torch.Tensor, ks: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
        hb = h.reshape(h.shape[0], *([1] * (xi.ndim - 1)))
        acc = sum(c * k for c, k in ks)
        return xi + hb * acc

    if isinstance(x, tuple):
        return tuple(one(xi, [(c, k[i]) for c, k in terms]) for i, xi in enumerate(x))
    return one(x, list(terms))


def _step(f: Dynamics, x: State, t: torch.Tensor, h: torch.Tensor, method: str) -> State:
    if method == "euler":
        return _axpy(x, h, (1.0, f(x, t)))
    if method == "heun":
        k1 = f(x, t)
        k2 = f(_axpy(x, h, (1.0, k1)), t + h)
        return _axpy(x, h, (0.5, k1), (0.5, k2))
    if method == "rk4":
        k1 = f(x, t)
        k2 = f(_axpy(x, h, (0.5, k1)), t + 0.5 * h)
        k3 = f(_axpy(x, h, (0.5, k2)), t + 0.5 * h)
        k4 = f(_axpy(x, h, (1.0, k3)), t + h)
        return _axpy(x, h, (1 / 6, k1), (1 / 3, k2), (1 / 3, k3), (1 / 6, k4))
    if method == "rk4_38":  # Kutta's 3/8 rule (torchdiffeq's "rk4")
        k1 = f(x, t)
        k2 = f(_axpy(x, h, (1 / 3, k1)), t + h / 3)
        k3 = f(_axpy(x, h, (-1 / 3, k1), (1.0, k2)), t + 2 * h / 3)
        k4 = f(_axpy(x, h, (1.0, k1), (-1.0, k2), (1.0, k3)), t + h)
        return _axpy(x, h, (1 / 8, k1), (3 / 8, k2), (3 / 8, k3), (1 / 8, k4))
    raise ValueError(f"unknown solver method {method!r}; choose one of {FIXED_METHODS}")


def batch_grid(t_grid: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(n + 1,)`` or ``(n + 1, B)`` -> ``(n + 1, B)``."""
    if t_grid.ndim == 1:
        return t_grid[:, None].expand(-1, batch_size)
    if t_grid.ndim == 2 and t_grid.shape[1] == batch_size:
        return t_grid
    raise ValueError(f"time grid must be (n+1,) or (n+1, {batch_size}), got {tuple(t_grid.shape)}")


def uniform_grid(
    t_start: torch.Tensor | float, t_end: torch.Tensor | float, steps: int, like: torch.Tensor
) -> torch.Tensor:
    """``steps + 1`` equally spaced times from ``t_start`` to ``t_end`` (scalars or ``(B,)``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a = torch.as_tensor(t_start, dtype=like.dtype, device=like.device)
    b = torch.as_tensor(t_end, dtype=like.dtype, device=like.device)
    frac = torch.linspace(0.0, 1.0, steps + 1, dtype=like.dtype, device=like.device)
    frac = frac.reshape(-1, *([1] * max(a.ndim, b.ndim)))
    return a + frac * (b - a)


def odeint_fixed(
    f: Dynamics,
    x0: State,
    t_grid: torch.Tensor,
    method: str = "euler",
    return_path: bool = False,
) -> State | tuple[State, list[State]]:
    """Integrate ``dx/dt = f(x, t)`` over ``t_grid`` with a fixed-step method.

    Returns the final state, and the list of ``n + 1`` states when ``return_path``.
    """
    if method not in FIXED_METHODS:
        raise ValueError(f"unknown solver method {method!r}; choose one of {FIXED_METHODS}")
    grid = batch_grid(t_grid, _batch_size(x0))
    x = x0
    path = [x0] if return_path else []
    for i in range(grid.shape[0] - 1):
        x = _step(f, x, grid[i], grid[i + 1] - grid[i], method)
        if return_path:
            path.append(x)
    return (x, path) if return_path else x


def odeint_adaptive(
    f: Dynamics,
    x0: torch.Tensor,
    t_span: tuple[float, float] = (0.0, 1.0),
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor:
    """Adaptive solve of ``dx/dt = f(x, t)`` from ``t_span[0]`` to ``t_span[1]`` with torchdiffeq.

    The whole batch shares one adaptive grid (torchdiffeq passes a scalar time, broadcast here).
    """
    from torchdiffeq import odeint

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return f(x, t.expand(x.shape[0]))

    ts = torch.tensor(t_span, dtype=x0.dtype, device=x0.device)
    return odeint(rhs, x0, ts, method=method, rtol=rtol, atol=atol)[-1]
