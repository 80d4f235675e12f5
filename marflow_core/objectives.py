"""Objectives: what the shared training loop optimizes. A method turns a batch into named losses.

``DistillationObjective`` = a trajectory-matching sampler (reflow or PeRFlow) + an optional MA term,
``total = L_TM + lambda L_MA``. Future methods (LFM, flow-map matching) implement ``Objective``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import NonFiniteLossError
from .marginal import MAConfig, ma_surrogate
from .models import VelocityField, expand_time
from .teachers import Teacher
from .trajectory import (
    TrajectoryDistance,
    WindowBatchSampler,
    squared_distance,
    trajectory_matching_loss,
)


@dataclass
class LossTerms:
    """``total`` is optimized; ``parts`` (floats) are logged. ``first_term``, when given, is the
    first summand of ``total`` (with its graph; ``L_TM`` of a distillation step with MA): on logged
    steps the trainer splits the gradient into that term's and the rest's (``lambda L_MA``), so the
    effective weight of each is visible."""

    total: torch.Tensor
    parts: dict[str, float]
    first_term: torch.Tensor | None = None


class Objective(Protocol):
    def __call__(
        self, model: VelocityField, batch, step: int, generator: torch.Generator | None
    ) -> LossTerms: ...


@dataclass
class DistillationObjective:
    """``L = L_TM + lambda L_MA`` on one window batch (MA skipped when ``ma`` is None or off-step).

    ``distance`` is the trajectory distance of ``L_TM`` (default: squared error); the end-point
    checks and the MA term are the same for every distance."""

    sampler: WindowBatchSampler
    teacher: Teacher | None = None
    ma: MAConfig | None = None
    distance: TrajectoryDistance = squared_distance

    def __post_init__(self) -> None:
        if self.ma is not None and self.teacher is None:
            raise ValueError("the MA term needs a teacher with a score")

    def __call__(self, model: VelocityField, batch, step: int, generator: torch.Generator | None) -> LossTerms:
        wb = self.sampler(batch, generator)
        for name in ("x_start", "y_end"):
            if not bool(torch.isfinite(getattr(wb, name)).all()):
                raise NonFiniteLossError(f"the teacher (or the pair bank) gave non-finite {name} "
                                         f"in {int((~torch.isfinite(getattr(wb, name))).sum())} entries")
        tm = trajectory_matching_loss(model, wb, distance=self.distance)
        parts = {"tm": float(tm.detach())}
        total = tm
        if self.ma is not None and self.ma.weight > 0 and step % self.ma.every == 0:
            ma = ma_surrogate(model, self.teacher, wb, self.ma, generator)
            parts["ma"] = float(ma.detach())
            total = total + self.ma.weight * ma
            parts["total"] = float(total.detach())
            return LossTerms(total, parts, first_term=tm)
        parts["total"] = float(total.detach())
        return LossTerms(total, parts)


@dataclass
class FlowMatchingObjective:
    """Conditional flow matching of the linear interpolant (docs/method.md, section 1), for training
    a teacher from data: ``x_t = (1 - t) x0 + t x1``, ``x0 ~ N(0, I)``, ``t ~ U[0, 1)``,
    ``L = mean || v(x_t, t) - (x1 - x0) ||^2``. The batch is ``x1: (B, ...)``."""

    def __call__(self, model: VelocityField, batch: torch.Tensor, step: int,
                 generator: torch.Generator | None) -> LossTerms:
        x1 = batch
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype).to(x1.device)
        xt = (1 - expand_time(t, x1)) * x0 + expand_time(t, x1) * x1
        loss = (model(xt, t) - (x1 - x0)).pow(2).mean()
        return LossTerms(loss, {"fm": float(loss.detach()), "total": float(loss.detach())})
