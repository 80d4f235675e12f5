"""Teachers: a frozen velocity field plus its score.

For the linear interpolant (docs/method.md, section 1) ``x_t = (1 - t) x0 + t x1`` the score follows from
the velocity, ``s(x, t) = (t v(x, t) - x) / (1 - t)``; it is singular at ``t = 1``, so evaluation
times are clipped to ``t_max < 1``. The exact Gaussian-mixture teacher (section 6) has closed forms
for everything and needs no cutoff.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import InvalidParameter
from .models import VelocityField, as_batch_time, expand_time


class Teacher(Protocol):
    """A frozen teacher: velocity ``v(x, t)`` and score ``s(x, t) = grad_x log p_t(x)``."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def score_from_velocity(
    field: VelocityField, x: torch.Tensor, t: torch.Tensor | float, t_max: float
) -> torch.Tensor:
    """``s(x, t) = (t' v(x, t') - x) / (1 - t')`` with ``t' = min(t, t_max)``; ``x: (B, ...)``."""
    if not 0.0 < t_max < 1.0:
        raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
    t = as_batch_time(t, x).clamp(max=t_max)
    tb = expand_time(t, x)
    return (tb * field(x, t) - x) / (1.0 - tb)


@dataclass
class VelocityTeacher:
    """Wraps any velocity network as a teacher; its score uses the ``t_max`` cutoff."""

    field: VelocityField
    t_max: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 < self.t_max < 1.0:
            raise ValueError(f"t_max must lie in (0, 1), got {self.t_max}")

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.field(x, as_batch_time(t, x))

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score_from_velocity(self.field, x, t, self.t_max)

    __call__ = velocity


class GaussianMixtureTeacher:
    """Exact rectified-flow teacher for ``x1 ~ sum_i pi_i N(mu_i, sigma_i^2 I)``, ``x0 ~ N(0, I)``.

    Every marginal is a mixture, ``p_t = sum_i pi_i N(t mu_i, var_i(t) I)`` with
    ``var_i(t) = t^2 sigma_i^2 + (1 - t)^2``. The velocity is ``E[x1 - x0 | x_t]``: per component
    ``v_i = mu_i + (t sigma_i^2 - (1 - t)) / var_i (x - t mu_i)``, weighted by responsibilities.
    All methods take ``x: (B, D)`` and ``t`` scalar or ``(B,)``.
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        means: Sequence[Sequence[float]] | torch.Tensor,
        stds: Sequence[float] | torch.Tensor,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        w = torch.as_tensor(weights, dtype=dtype, device=device)
        mu = torch.as_tensor(means, dtype=dtype, device=device)
        sd = torch.as_tensor(stds, dtype=dtype, device=device)
        if w.ndim != 1 or len(w) < 1:
            raise InvalidParameter("weights", w.tolist(), "need a non-empty list of M weights")
        if mu.ndim != 2:
            raise InvalidParameter("means", mu.tolist(), "need a list of points of one dimension")
        if sd.ndim != 1:
            raise InvalidParameter("stds", sd.tolist(), "need a list of numbers")
        if not len(w) == len(mu) == len(sd):
            raise InvalidParameter("weights", w.tolist(), f"{len(w)} weights, {len(mu)} means and {len(sd)} "
                                   f"stds: one weight, one mean and one std per mode")
        if (w <= 0).any():
            raise InvalidParameter("weights", w.tolist(), "must be > 0")
        if (sd <= 0).any():
            raise InvalidParameter("stds", sd.tolist(), "must be > 0")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = sd

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on another device / dtype."""
        dtype = dtype or self.means.dtype
        device = device or self.means.device
        return GaussianMixtureTeacher(self.weights, self.means, self.stds, dtype, device)

    # -- per-component quantities ------------------------------------------------------------
    def _variances(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,) -> (B, M)``: ``t^2 sigma_i^2 + (1 - t)^2``."""
        t = t[:, None]
        return t**2 * self.stds[None, :] ** 2 + (1.0 - t) ** 2

    def _centred(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(B, M, D)``: ``x - t mu_i``."""
        return x[:, None, :] - t[:, None, None] * self.means[None, :, :]

    def component_log_probs(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``(B, M)``: ``log pi_i + log N(x; t mu_i, var_i I)``."""
        t = as_batch_time(t, x)
        var = self._variances(t)
        sq = self._centred(x, t).pow(2).sum(-1)
        d = self.dim
        return self.weights.log()[None, :] - 0.5 * (sq / var + d * torch.log(2 * math.pi * var))

    def responsibilities(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``(B, M)`` posterior component probabilities given ``x_t = x``."""
        return torch.softmax(self.component_log_probs(x, t), dim=-1)

    # -- the teacher interface ----------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``(B,)`` exact ``log p_t(x)``."""
        return torch.logsumexp(self.component_log_probs(x, t), dim=-1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``(B, D)`` exact ``E[x1 - x0 | x_t = x]``."""
        t = as_batch_time(t, x)
        var = self._variances(t)
        gain = (t[:, None] * self.stds[None, :] ** 2 - (1.0 - t[:, None])) / var  # (B, M)
        v_i = self.means[None] + gain[..., None] * self._centred(x, t)  # (B, M, D)
        r = self.responsibilities(x, t)
        return (r[..., None] * v_i).sum(1)

    __call__ = velocity

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``(B, D)`` exact ``grad_x log p_t(x) = -sum_i r_i (x - t mu_i) / var_i``."""
        t = as_batch_time(t, x)
        var = self._variances(t)
        r = self.responsibilities(x, t)
        return -(r[..., None] * self._centred(x, t) / var[..., None]).sum(1)

    def sample(
        self,
        n: int,
        t: float = 1.0,
        generator: torch.Generator | None = None,
        return_components: bool = False,
    ):
        """``n`` exact samples of ``p_t``: ``(n, D)`` (and their ``(n,)`` component labels)."""
        dev, dt = self.means.device, self.means.dtype
        idx = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=dt).to(dev)
        idx = idx.to(dev)
        tt = torch.full((n,), float(t), dtype=dt, device=dev)
        std = self._variances(tt).gather(1, idx[:, None]).sqrt()
        x = t * self.means[idx] + std * z
        return (x, idx) if return_components else x
