"""Exact and sample-based metrics of the 2-D tier.

A few-step student is a discrete map ``y = S(x0)``; its log-density at its own samples is exact by
the change of variables of each Euler step (``marflow_core.euler_map_with_logdet``). With the
teacher's closed-form ``log p``, ``KL(q || p) = E_q[log q - log p]`` and
``TV(q, p) = E_q[max(0, 1 - p / q)]`` are plain Monte-Carlo means over the student's samples: no
grid, no inversion. Each comes with its Monte-Carlo standard error ``std / sqrt(n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from marflow_core import GaussianMixtureTeacher, TimeWindows, VelocityField, euler_map_with_logdet

from ..common.stats import Estimate, mc_mean, standard_normal_log_prob


def kl_tv(log_q: torch.Tensor, log_p: torch.Tensor) -> dict[str, Estimate]:
    """``KL(q||p)`` and ``TV(q, p)`` from log-densities at samples of ``q``."""
    log_ratio = log_q - log_p
    return {"kl": mc_mean(log_ratio), "tv": mc_mean((1 - torch.exp(-log_ratio)).clamp(min=0))}


@dataclass
class MapDensities:
    """Samples ``y`` of a map and exact ``log q(y)`` (student) and ``log p(y)`` (teacher target)."""

    y: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor
    n_folded: int


def sampler_densities(
    model: VelocityField, windows: TimeWindows, n_steps: int, x0: torch.Tensor, teacher: GaussianMixtureTeacher
) -> MapDensities:
    """The ``n_steps`` Euler sampler from ``x0 ~ N(0, I)``: exact ``log q`` and the teacher's ``log p_1``."""
    grid = windows.step_grid(n_steps, strict=False).to(dtype=x0.dtype, device=x0.device)
    flow = euler_map_with_logdet(model, x0, grid)
    log_q = standard_normal_log_prob(x0) - flow.logdet
    return MapDensities(flow.x, log_q, teacher.log_prob(flow.x, 1.0), flow.n_folded)


def window_densities(
    model: VelocityField, teacher: GaussianMixtureTeacher, t_start: float, t_end: float, steps: int,
    n: int, generator: torch.Generator,
) -> MapDensities:
    """One window: ``x ~ p^T_{t_start}`` exactly, ``y = Euler map``; ``log p`` is ``p^T_{t_end}``."""
    x = teacher.sample(n, t_start, generator)
    grid = torch.linspace(t_start, t_end, steps + 1, dtype=x.dtype, device=x.device)
    flow = euler_map_with_logdet(model, x, grid)
    log_q = teacher.log_prob(x, t_start) - flow.logdet
    return MapDensities(flow.x, log_q, teacher.log_prob(flow.x, t_end), flow.n_folded)


def mode_mass(
    samples: torch.Tensor, teacher: GaussianMixtureTeacher, outlier_sigmas: float = 3.0
) -> dict[str, object]:
    """Mass per mode (nearest by responsibility), its half-L1 error to the weights, and the off-mode
    fraction: samples farther than ``outlier_sigmas`` stds from every mode (mass between modes)."""
    labels = teacher.responsibilities(samples, 1.0).argmax(-1)
    mass = torch.bincount(labels, minlength=teacher.n_components).to(samples.dtype) / len(samples)
    dist = (samples[:, None, :] - teacher.means[None]).norm(dim=-1) / teacher.stds[None]
    off = float((dist.min(-1).values > outlier_sigmas).to(samples.dtype).mean())
    return {"mass": mass.tolist(), "mass_error": float(0.5 * (mass - teacher.weights).abs().sum()),
            "off_mode": off, "off_mode_se": math.sqrt(off * (1 - off) / len(samples))}


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, n_projections: int, generator: torch.Generator
) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples ``(n, D)``: random unit directions,
    sorted 1-D projections, ``sqrt(mean over directions and ranks of squared gaps)``."""
    if a.shape != b.shape:
        raise ValueError(f"sliced Wasserstein needs equal shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], n_projections, generator=generator, dtype=a.dtype).to(a.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels ``exp(-|x - y|^2 / (2 h^2))``."""
    def kernel(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(a), len(b)
    kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())


def as_row(**values) -> dict[str, object]:
    """Flatten ``Estimate`` values into ``name`` / ``name_se`` columns."""
    row: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, Estimate):
            row[key], row[f"{key}_se"] = value.value, value.stderr
        else:
            row[key] = value
    return row


__all__ = ["MapDensities", "as_row", "kl_tv", "mmd_rbf", "mode_mass", "sampler_densities",
           "sliced_wasserstein", "window_densities"]
