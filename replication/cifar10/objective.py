"""The CIFAR-10 losses with per-sample randomness: what one process computes on its share of a batch.

Every sample at global position ``p`` of step ``s`` draws from its own stream
(``BatchPlan.generators``: ``stream(seed, "cifar10-train", s, p)``), in this order: a flip bit, a
uniform time ``u``, a noise image and (with MA) its Hutchinson probes (``draw_samples``). A global
batch split over processes therefore computes what one process computes for the whole batch, and
the loss of a micro-batch is built from the core's functions:

- teacher (1-rectified flow): the single window ``[0, 1]`` from ``x_s = noise`` to ``y_T = x1``
  (a training image) at ``t = u``; ``L_TM`` of that ``WindowBatch`` is flow matching,
  ``mean || v(x_t, t) - (x1 - x0) ||^2`` with ``x_t = (1 - t) x0 + t x1``;
- reflow: the same window on a pair ``(x0, Phi^T(x0))`` of the bank;
- PeRFlow: ``t = u`` in window ``k``, the start ``x_s`` from the noise (``noised_data``:
  ``(1 - t_k) noise + t_k x1``; ``teacher_ode``: the teacher from the noise) and the teacher's window
  solve ``y_T`` (``PeRFlowSampler``'s, batched);
- plus, for MA students on MA steps, ``lambda L_MA`` (``ma_surrogate`` with the per-sample probes).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from marflow_core import PeRFlowSampler, TimeWindows, WindowBatch
from marflow_core.errors import NonFiniteLossError
from marflow_core.marginal import MAConfig, ma_surrogate
from marflow_core.models import VelocityField, expand_time
from marflow_core.solvers import odeint_fixed, uniform_grid
from marflow_core.teachers import Teacher
from marflow_core.trajectory import TrajectoryDistance, squared_distance, trajectory_matching_loss


@dataclass
class SampleDraws:
    """The per-sample random draws of one micro-batch of ``B`` samples (CPU tensors)."""

    flip: torch.Tensor           # (B,) bool: mirror the training image left-right
    u: torch.Tensor              # (B,) uniform in [0, 1): the time
    noise: torch.Tensor          # (B, C, H, W) standard normal
    probes: torch.Tensor | None  # (P, B, C, H, W) Hutchinson probes, or None


def draw_samples(generators: list[torch.Generator], shape: tuple[int, ...], n_probes: int = 0,
                 probe_kind: str | None = None) -> SampleDraws:
    """Each sample's draws from its own generator (``shape`` = (C, H, W)), in the documented order."""
    flip, u, noise, probes = [], [], [], []
    for g in generators:
        flip.append(torch.rand((), generator=g) < 0.5)
        u.append(torch.rand((), generator=g))
        noise.append(torch.randn(shape, generator=g))
        if probe_kind == "rademacher":
            probes.append(torch.randint(0, 2, (n_probes, *shape), generator=g).float() * 2 - 1)
        elif probe_kind == "gaussian":
            probes.append(torch.randn((n_probes, *shape), generator=g))
        elif probe_kind is not None:
            raise ValueError(f"probe_kind={probe_kind!r}: 'rademacher' or 'gaussian'")
    return SampleDraws(torch.stack(flip), torch.stack(u), torch.stack(noise),
                       torch.stack(probes, 1) if probes else None)


def flipped(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``images (B, C, H, W)`` mirrored left-right where ``flip (B,)``."""
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def straight_batch(x0: torch.Tensor, x1: torch.Tensor, u: torch.Tensor) -> WindowBatch:
    """The single window ``[0, 1]`` from ``x0`` to ``x1`` at times ``u``: flow matching on independent
    pairs (the teacher) or on teacher pairs (reflow)."""
    t = u.to(x0.device, x0.dtype)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    return WindowBatch(x0, x1, torch.zeros(len(t), dtype=torch.long, device=x0.device), t, zeros, ones)


@torch.no_grad()
def perflow_batch(sampler: PeRFlowSampler, x1: torch.Tensor, u: torch.Tensor, noise: torch.Tensor) -> WindowBatch:
    """PeRFlow's ``WindowBatch`` of data ``x1`` with the given times ``u`` and noise (what
    ``PeRFlowSampler.__call__`` builds from the same draws of its generator)."""
    windows: TimeWindows = sampler.windows
    t = u.to(x1.device, x1.dtype)
    k = windows.index(t)
    t_start, t_end = windows.bounds(k, x1)
    eps = noise.to(x1.device, x1.dtype)
    if sampler.start == "noised_data":
        x_start = (1 - expand_time(t_start, x1)) * eps + expand_time(t_start, x1) * x1
        y_end = odeint_fixed(sampler.teacher, x_start, uniform_grid(t_start, t_end, sampler.teacher_steps, x1),
                             sampler.solver)
    else:
        states = sampler.teacher_boundary_states(eps)
        rows = torch.arange(x1.shape[0], device=x1.device)
        x_start, y_end = states[k, rows], states[k + 1, rows]
    return WindowBatch(x_start, y_end, k, t, t_start, t_end)


@dataclass
class CifarLoss:
    """``L = L_TM + lambda L_MA`` of one window batch (MA on steps ``step % ma.every == 0`` when
    ``ma`` is set), ``L_TM`` logged as ``tm_name`` (``fm`` for the teacher). ``ma_passes()`` is the
    context the MA passes run in (float32, TF32 off: ``accelerate_train.float32_passes``)."""

    teacher: Teacher | None = None
    ma: MAConfig | None = None
    distance: TrajectoryDistance = squared_distance
    tm_name: str = "tm"
    ma_passes: Callable[[], object] | None = None

    def __post_init__(self) -> None:
        if self.ma is not None and self.teacher is None:
            raise ValueError("the MA term needs a teacher with a score")

    def __call__(self, model: VelocityField, wb: WindowBatch, step: int,
                 probes: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        for name in ("x_start", "y_end"):
            if not bool(torch.isfinite(getattr(wb, name)).all()):
                raise NonFiniteLossError(f"step {step}: the teacher (or the pair bank) gave non-finite {name} "
                                         f"in {int((~torch.isfinite(getattr(wb, name))).sum())} entries")
        tm = trajectory_matching_loss(model, wb, distance=self.distance)
        parts = {self.tm_name: float(tm.detach())}
        total = tm
        if self.ma is not None and self.ma.weight > 0 and step % self.ma.every == 0:
            with self.ma_passes() if self.ma_passes is not None else nullcontext():
                term = ma_surrogate(model, self.teacher, wb, self.ma,
                                    probes=None if probes is None else probes.to(wb.x_start))
            parts["ma"] = float(term.detach())
            total = total + self.ma.weight * term
        parts["total"] = float(total.detach())
        return total, parts
