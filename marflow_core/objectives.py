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
from .models import VelocityField
from .teachers import Teacher
from .trajectory import WindowBatchSampler, trajectory_matching_loss


@dataclass
class LossTerms:
    """``total`` is optimized; ``parts`` (floats) are logged."""

    total: torch.Tensor
    parts: dict[str, float]


class Objective(Protocol):
    def __call__(
        self, model: VelocityField, batch, step: int, generator: torch.Generator | None
    ) -> LossTerms: ...


@dataclass
class DistillationObjective:
    """``L = L_TM + lambda L_MA`` on one window batch (MA skipped when ``ma`` is None or off-step)."""

    sampler: WindowBatchSampler
    teacher: Teacher | None = None
    ma: MAConfig | None = None

    def __post_init__(self) -> None:
        if self.ma is not None and self.teacher is None:
            raise ValueError("the MA term needs a teacher with a score")

    def __call__(self, model: VelocityField, batch, step: int, generator: torch.Generator | None) -> LossTerms:
        wb = self.sampler(batch, generator)
        for name in ("x_start", "y_end"):
            if not bool(torch.isfinite(getattr(wb, name)).all()):
                raise NonFiniteLossError(f"the teacher (or the pair bank) gave non-finite {name} "
                                         f"in {int((~torch.isfinite(getattr(wb, name))).sum())} entries")
        tm = trajectory_matching_loss(model, wb)
        parts = {"tm": float(tm.detach())}
        total = tm
        if self.ma is not None and self.ma.weight > 0 and step % self.ma.every == 0:
            ma = ma_surrogate(model, self.teacher, wb, self.ma, generator)
            parts["ma"] = float(ma.detach())
            total = total + self.ma.weight * ma
        parts["total"] = float(total.detach())
        return LossTerms(total, parts)
