"""Piecewise reflow (PeRFlow): per-sample windows, window starts, and the teacher's window solve.

Window starts ``x_s`` at ``t_k``: ``"noised_data"`` uses ``(1 - t_k) eps + t_k x1`` (online, no pair
bank); ``"teacher_ode"`` solves the teacher from noise through all windows, which also yields every
window's teacher end point. ``y_T = Phi^T_k(x_s)`` uses ``M`` steps of a fixed-grid solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidParameter
from .models import VelocityField, expand_time
from .solvers import FIXED_METHODS, odeint_fixed, uniform_grid
from .trajectory import WindowBatch
from .windows import TimeWindows

WINDOW_STARTS: tuple[str, ...] = ("noised_data", "teacher_ode")


@dataclass
class PeRFlowConfig:
    """The teacher's window solve: ``teacher_steps`` (``M``) steps of ``solver``; window ``start``."""

    teacher_steps: int = 4
    solver: str = "rk4"
    start: str = "noised_data"

    def __post_init__(self) -> None:
        if self.teacher_steps < 1:
            raise InvalidParameter("teacher_steps", self.teacher_steps, "M must be >= 1")
        if self.solver not in FIXED_METHODS:
            raise InvalidParameter("solver", self.solver, f"one of {FIXED_METHODS}")
        if self.start not in WINDOW_STARTS:
            raise InvalidParameter("start", self.start, f"one of {WINDOW_STARTS}")


@dataclass
class PeRFlowSampler:
    """Builds a ``WindowBatch`` from a data batch ``x1: (B, ...)``."""

    windows: TimeWindows
    teacher: VelocityField
    teacher_steps: int = 4
    solver: str = "rk4"
    start: str = "noised_data"

    def __post_init__(self) -> None:
        PeRFlowConfig(self.teacher_steps, self.solver, self.start)  # the one copy of the checks

    @classmethod
    def from_config(cls, windows: TimeWindows, teacher: VelocityField, config: PeRFlowConfig):
        return cls(windows, teacher, config.teacher_steps, config.solver, config.start)

    @torch.no_grad()
    def __call__(self, x1: torch.Tensor, generator: torch.Generator | None) -> WindowBatch:
        t, k = self.windows.sample_times(x1.shape[0], generator, x1)
        t_start, t_end = self.windows.bounds(k, x1)
        eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        if self.start == "noised_data":
            x_start = (1 - expand_time(t_start, x1)) * eps + expand_time(t_start, x1) * x1
            grid = uniform_grid(t_start, t_end, self.teacher_steps, x1)
            y_end = odeint_fixed(self.teacher, x_start, grid, self.solver)
        else:
            states = self.teacher_boundary_states(eps)
            rows = torch.arange(x1.shape[0], device=x1.device)
            x_start, y_end = states[k, rows], states[k + 1, rows]
        return WindowBatch(x_start, y_end, k, t, t_start, t_end)

    def teacher_boundary_states(self, x0: torch.Tensor) -> torch.Tensor:
        """``(K + 1, B, ...)``: the teacher ODE from noise, recorded at every window boundary."""
        b = self.windows.boundaries(x0)
        states = [x0]
        for i in range(self.windows.n_windows):
            grid = uniform_grid(b[i], b[i + 1], self.teacher_steps, x0)
            states.append(odeint_fixed(self.teacher, states[-1], grid, self.solver))
        return torch.stack(states)
