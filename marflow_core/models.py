"""Velocity models: the protocol every field obeys and a small time-conditioned MLP.

A velocity model maps ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)`` to ``v(x, t)`` of the
shape of ``x``. Time runs from noise (``t = 0``) to data (``t = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .errors import InvalidParameter


@runtime_checkable
class VelocityField(Protocol):
    """Anything callable as ``v(x, t)`` with ``x: (B, ...)``, ``t: (B,)`` -> ``(B, ...)``.

    The one velocity-field type of the code base: students, teachers' velocities, the difference
    field of estimator (A) and plain lambdas all satisfy it.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class JacobianField(Protocol):
    """A velocity field that also returns its exact Jacobian ``J: (B, D, D)``, ``J[b, i, j] =
    dv_i / dx_j``, cheaper than ``D`` vector-Jacobian products (``batch_jacobian`` uses it)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def jacobian(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


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


@dataclass
class TimeMLPConfig:
    """Width ``hidden``, ``depth`` hidden layers, an even ``time_dim`` sinusoidal time embedding."""

    hidden: int = 128
    depth: int = 3
    time_dim: int = 32

    def __post_init__(self) -> None:
        for key in ("hidden", "depth", "time_dim"):
            if getattr(self, key) < 1:
                raise InvalidParameter(key, getattr(self, key), "must be >= 1")
        if self.time_dim % 2:
            raise InvalidParameter("time_dim", self.time_dim, "must be even (sin and cos pairs)")


class TimeMLP(nn.Module):
    """A velocity MLP for low-dimensional data: ``v(x, t) = MLP([x, emb(t)])``, ``x: (B, D)``.

    SiLU activations keep the field smooth, so divergences and Jacobians are well defined.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        TimeMLPConfig(hidden, depth, time_dim)  # the one copy of the checks
        if dim < 1:
            raise InvalidParameter("dim", dim, "must be >= 1")
        self.dim = dim
        self.time_embedding = SinusoidalTimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width_in = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.SiLU()]
            width_in = hidden
        layers.append(nn.Linear(width_in, dim))
        self.net = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, dim: int, config: TimeMLPConfig) -> TimeMLP:
        return cls(dim, config.hidden, config.depth, config.time_dim)

    def jacobian(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, J)`` with ``J = W_L diag(silu'(z_{L-1})) W_{L-1} ... diag(silu'(z_1)) W_1[:, :D]``.

        Forward-mode propagation of ``dh/dx`` through the layers, kept as a ``(width, B * D)``
        matrix so that each linear layer is one GEMM (``B * width_in * width_out * D`` flops, like
        ``D`` backward passes, without their per-pass overhead). Differentiable (training).
        ``silu'(z) = s (1 + z (1 - s))`` with ``s = sigmoid(z)``.
        """
        t = as_batch_time(t, x)
        batch, dim = x.shape
        h = torch.cat([x, self.time_embedding(t)], dim=-1)
        jac: torch.Tensor | None = None  # dh/dx as (width, B * D)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                w = layer.weight
                if jac is None:
                    jac = w[:, None, :dim].expand(-1, batch, -1).reshape(w.shape[0], batch * dim)
                else:
                    jac = w @ jac
                h = layer(h)
            else:  # SiLU
                s = torch.sigmoid(h)
                slope = (s * (1 + h * (1 - s))).T  # (width, B)
                jac = (jac.view(-1, batch, dim) * slope[:, :, None]).view(-1, batch * dim)
                h = layer(h)  # the module itself, so that v is bit-identical to forward()
        return h, jac.view(dim, batch, dim).transpose(0, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = as_batch_time(t, x)
        return self.net(torch.cat([x, self.time_embedding(t)], dim=-1))
