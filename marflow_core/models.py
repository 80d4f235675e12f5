"""Velocity models: the protocol every field obeys and a small time-conditioned MLP.

A velocity model maps ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)`` to ``v(x, t)`` of the
shape of ``x``. Time runs from noise (``t = 0``) to data (``t = 1``).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class VelocityField(Protocol):
    """Anything callable as ``v(x, t)`` with ``x: (B, ...)``, ``t: (B,)`` -> ``(B, ...)``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def as_batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` time to shape ``(B,)`` on ``x``'s device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape ``t: (B,)`` to ``(B, 1, ..., 1)`` so that it broadcasts against ``x: (B, ...)``."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class SinusoidalTimeEmbedding(nn.Module):
    """``t: (B,)`` -> ``(B, dim)`` features ``[sin(w_j t), cos(w_j t)]`` on a geometric frequency grid."""

    def __init__(self, dim: int = 32, max_frequency: float = 64.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        frequencies = torch.exp(torch.linspace(0.0, math.log(max_frequency), dim // 2))
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.frequencies[None, :] * math.pi
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeMLP(nn.Module):
    """A velocity MLP for low-dimensional data: ``v(x, t) = MLP([x, emb(t)])``, ``x: (B, D)``.

    SiLU activations keep the field smooth, so divergences and Jacobians are well defined.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"TimeMLP needs dim, hidden, depth >= 1, got {dim}, {hidden}, {depth}")
        self.dim = dim
        self.time_embedding = SinusoidalTimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width_in = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.SiLU()]
            width_in = hidden
        layers.append(nn.Linear(width_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = as_batch_time(t, x)
        return self.net(torch.cat([x, self.time_embedding(t)], dim=-1))
