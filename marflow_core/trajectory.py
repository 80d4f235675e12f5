"""Trajectory matching (docs/method.md, section 2): window batches, the loss, and the few-step sampler.

A ``WindowBatch`` is what every trajectory-matching method produces from a data batch: per sample a
window ``k``, its start ``x_s`` at ``t_k``, the teacher's end point ``y_T`` at ``t_{k+1}`` and a time
``t`` in the window. Reflow and PeRFlow differ only in how they build it (``reflow.py``,
``perflow.py``); the loss and the marginal-alignment term consume it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .models import VelocityField
from .solvers import odeint_fixed
from .windows import TimeWindows, segment_point, segment_velocity


@dataclass
class WindowBatch:
    """``x_start, y_end: (B, ...)``; ``k: (B,)`` long; ``t, t_start, t_end: (B,)``."""

    x_start: torch.Tensor
    y_end: torch.Tensor
    k: torch.Tensor
    t: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor

    def head(self, n: int) -> WindowBatch:
        """The first ``n`` rows."""
        return WindowBatch(*(getattr(self, f)[:n] for f in ("x_start", "y_end", "k", "t", "t_start", "t_end")))

    def point(self) -> torch.Tensor:
        """The student's input ``x_t`` on the straight segment."""
        return segment_point(self.x_start, self.y_end, self.t, self.t_start, self.t_end)

    def target(self) -> torch.Tensor:
        """The constant velocity target of the window."""
        return segment_velocity(self.x_start, self.y_end, self.t_start, self.t_end)


class WindowBatchSampler(Protocol):
    """Turns a data batch into a ``WindowBatch`` (no gradients flow through it)."""

    def __call__(self, batch, generator: torch.Generator | None) -> WindowBatch: ...


#: ``distance(prediction, target) -> cost``: the trajectory distance of ``L_TM``. Both inputs are
#: ``(B, ...)``; the cost is per element ``(B, ...)`` or per sample ``(B,)``, and ``L_TM`` is its mean.
TrajectoryDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def squared_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(v - u)^2`` per element: ``L_TM`` is then the mean squared error of docs/method.md, section 2."""
    return (prediction - target).pow(2)


def trajectory_matching_loss(model: VelocityField, wb: WindowBatch, per_sample: bool = False,
                             distance: TrajectoryDistance = squared_distance) -> torch.Tensor:
    """``L_TM = mean d(v_theta(x_t, t), (y_T - x_s)/(t_{k+1} - t_k))``, averaged over batch (and dims
    for a per-element distance); the default ``d`` is the squared error.

    ``per_sample`` returns the ``(B,)`` per-sample costs instead (means over dims; for error bars).
    """
    cost = distance(model(wb.point(), wb.t), wb.target())
    if per_sample:
        return cost.flatten(1).mean(1) if cost.ndim > 1 else cost
    return cost.mean()


@torch.no_grad()
def sample_few_step(
    model: VelocityField,
    x0: torch.Tensor,
    windows: TimeWindows,
    n_steps: int,
    strict: bool = False,
    return_path: bool = False,
):
    """Euler sampler from noise ``x0: (B, ...)`` at ``t = 0`` with ``n_steps`` spread over the windows."""
    grid = windows.step_grid(n_steps, strict=strict).to(dtype=x0.dtype, device=x0.device)
    return odeint_fixed(model, x0, grid, "euler", return_path=return_path)
