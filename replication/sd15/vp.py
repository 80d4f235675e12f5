"""The eps-prediction (variance-preserving) adapter of docs/method.md, section 7. Torch only.

Three clocks meet here:

- core time ``t`` in ``[0, 1]``, ``t = 0`` noise, ``t = 1`` data (the rest of ``marflow_core``);
- SD time ``tau = (1 - t) T`` in ``[0, T]``, ``tau = T`` noise: the timestep that the published PeRFlow
  scheduler hands to the student and that this module's window boundaries use;
- the table index ``i = tau - 1`` of ``alphas_cumprod`` (``0 .. T-1``), which is the timestep a
  diffusers eps-model such as the SD 1.5 UNet was trained on. ``abar(tau) = alphas_cumprod[tau - 1]``,
  clamped to index 0 at the clean end (``tau < 1``), as PeRFlow does.

Window ``k`` of ``K`` equal windows runs from ``t_k = k / K`` to ``t_{k+1}``, i.e. from
``tau_s = (K - k) T / K`` down to ``tau_e = (K - k - 1) T / K``. A DDIM jump from the window start is
``x_e = lambda x_s + eta eps`` and the student's eps target makes that jump land on the teacher's end
point. Every function is vectorised over per-sample ``(B,)`` times or windows; dtype and device follow
the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from marflow_core.errors import InvalidParameter

PREDICTION_TYPES: tuple[str, ...] = ("diff_eps", "ddim_eps", "velocity")
EPS_PREDICTION_TYPES: tuple[str, ...] = ("diff_eps", "ddim_eps")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")

EpsModel = Callable[..., torch.Tensor]
"""``eps_model(x, index, **cond) -> eps``: ``x: (B, ...)``, ``index: (B,)`` float table index."""


def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` coefficient -> ``(B, 1, ..., 1)`` in ``x``'s dtype, broadcasting against ``x: (B, ...)``."""
    c = c.to(dtype=x.dtype, device=x.device)
    return c.reshape(c.shape[0], *([1] * (x.ndim - 1))) if c.ndim == 1 else c


# ---------------------------------------------------------------------------------------- schedule
def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(T,)`` betas: ``linear`` in beta, ``scaled_linear`` linear in ``sqrt(beta)`` (SD 1.5), or the
    ``squaredcos_cap_v2`` cosine schedule ``abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``, beta <= 0.999."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=dtype, device=device)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype, device=device) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        s = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999).to(dtype=dtype, device=device)
    raise InvalidParameter("beta_schedule", beta_schedule, f"one of {BETA_SCHEDULES}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``abar_i = prod_{j <= i} (1 - beta_j)``, ``(T,)``."""
    return torch.cumprod(1 - betas, dim=0)


def sd15_alphas_cumprod(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
    """SD 1.5's ``(1000,)`` table: ``scaled_linear`` betas from 0.00085 to 0.012."""
    return alphas_cumprod_from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear", dtype, device))


@dataclass(frozen=True)
class VPSchedule:
    """A discrete VP noise schedule (defaults: SD 1.5)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise InvalidParameter("num_train_timesteps", self.num_train_timesteps, "must be >= 2")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise InvalidParameter("beta_schedule", self.beta_schedule, f"one of {BETA_SCHEDULES}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise InvalidParameter("beta_start", (self.beta_start, self.beta_end),
                                   "need 0 < beta_start <= beta_end < 1")

    def alphas_cumprod(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        """The ``(T,)`` table ``abar``."""
        return alphas_cumprod_from_betas(make_betas(self.num_train_timesteps, self.beta_start,
                                                    self.beta_end, self.beta_schedule, dtype, device))


# ------------------------------------------------------------------------------------------- clocks
def tau_from_t(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD time ``tau = (1 - t) T`` (``t = 0`` noise -> ``tau = T``)."""
    return (1 - t) * num_train_timesteps


def t_from_tau(tau: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Core time ``t = 1 - tau / T``."""
    return 1 - tau / num_train_timesteps


def table_index(tau: torch.Tensor) -> torch.Tensor:
    """The ``alphas_cumprod`` index (and eps-model timestep) of SD time ``tau``: ``i = tau - 1``."""
    return tau - 1


def abar_at_index(alphas_cumprod: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``abar`` at (B,) possibly fractional table indices: linear interpolation, clamped to ``[0, T-1]``.

    Returned in ``index``'s float dtype (float64 for integer indices) on its device.
    """
    dtype = index.dtype if index.is_floating_point() else torch.float64
    table = alphas_cumprod.to(device=index.device, dtype=torch.float64)
    pos = index.to(torch.float64).clamp(0, len(table) - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    w = pos - lo
    return ((1 - w) * table[lo] + w * table[hi]).to(dtype)


def abar_at(alphas_cumprod: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``abar(tau) = alphas_cumprod[tau - 1]`` (interpolated; ``tau <= 1`` gives ``alphas_cumprod[0]``)."""
    return abar_at_index(alphas_cumprod, table_index(tau))


def vp_marginal(z: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Forward noising ``x_tau = sqrt(abar) z + sqrt(1 - abar) eps``; ``abar: (B,)``."""
    return _expand(abar.sqrt(), z) * z + _expand((1 - abar).sqrt(), z) * eps


def teacher_score(eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Score of the teacher's marginal from its eps: ``s = -eps / sqrt(1 - abar)``."""
    return -eps / _expand((1 - abar).sqrt(), eps)


# ------------------------------------------------------------------------------------------ windows
def window_bounds_tau(k: torch.Tensor, num_windows: int, num_train_timesteps: int = 1000):
    """SD times ``(tau_s, tau_e) = ((K - k) T / K, (K - k - 1) T / K)`` of windows ``k: (B,)``."""
    k = k.to(torch.float64)
    step = num_train_timesteps / num_windows
    return (num_windows - k) * step, (num_windows - k - 1) * step


def window_index_of_tau(tau: torch.Tensor, num_windows: int, num_train_timesteps: int = 1000):
    """``(B,)`` long window of SD time ``tau``: ``tau_s >= tau > tau_e`` (PeRFlow's rule, with a
    tolerance of 0.1 timestep, so that ``tau = T K' / K`` opens window ``K - K'``); ``tau = 0`` -> ``K-1``."""
    frac = (num_train_timesteps - tau.to(torch.float64) + 0.1) * num_windows / num_train_timesteps
    return frac.floor().long().clamp(0, num_windows - 1)


def window_abars(alphas_cumprod: torch.Tensor, k: torch.Tensor, num_windows: int):
    """``(abar_s, abar_e)`` at the start and end of windows ``k: (B,)`` (float64)."""
    tau_s, tau_e = window_bounds_tau(k, num_windows, len(alphas_cumprod))
    return abar_at(alphas_cumprod, tau_s), abar_at(alphas_cumprod, tau_e)


def window_lambda(abar_s: torch.Tensor, abar_e: torch.Tensor) -> torch.Tensor:
    """``lambda = sqrt(abar_e / abar_s)`` (both eps parametrisations)."""
    return (abar_e / abar_s).sqrt()


def window_eta(abar_s: torch.Tensor, abar_e: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``ddim_eps``: ``eta = sqrt(1 - abar_e) - sqrt(abar_e (1 - abar_s) / abar_s)``;
    ``diff_eps``: ``eta = -sqrt((abar_e - abar_s) / abar_s)``."""
    if prediction_type == "ddim_eps":
        return (1 - abar_e).sqrt() - (abar_e * (1 - abar_s) / abar_s).sqrt()
    if prediction_type == "diff_eps":
        return -((abar_e - abar_s) / abar_s).sqrt()
    raise InvalidParameter("prediction_type", prediction_type, f"eta is defined for {EPS_PREDICTION_TYPES}")


def window_coefficients(abar_s: torch.Tensor, abar_e: torch.Tensor, prediction_type: str):
    """``(lambda, eta)`` of the window jump ``x_e = lambda x_s + eta eps``."""
    return window_lambda(abar_s, abar_e), window_eta(abar_s, abar_e, prediction_type)


def eps_target(x_s: torch.Tensor, y_e: torch.Tensor, lam: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """The eps that makes the window jump from ``x_s`` land on ``y_e``: ``(y_e - lambda x_s) / eta``."""
    return (y_e - _expand(lam, x_s) * x_s) / _expand(eta, x_s)


def window_end_from_eps(x: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor, eta: torch.Tensor):
    """The predicted window end ``lambda x + eta eps``."""
    return _expand(lam, x) * x + _expand(eta, x) * eps


def segment_coefficients(lam: torch.Tensor, eta: torch.Tensor, r: torch.Tensor):
    """Coefficients ``(lambda_r, eta_r)`` that predict the window end from the point
    ``x_r = (1 - r) x_s + r y_e`` of the straight segment (``r`` = fraction of the window done) with
    the same eps: ``lambda_r = lambda / (r lambda + 1 - r)``, ``eta_r = (1 - r) eta / (r lambda + 1 - r)``.

    From ``y_e = lambda x_s + eta eps`` and the segment point, eliminating ``x_s``.
    """
    den = r * lam + (1 - r)
    return lam / den, (1 - r) * eta / den


def velocity_target(
    x_s: torch.Tensor, y_e: torch.Tensor, tau_s: torch.Tensor, tau_e: torch.Tensor,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """PeRFlow's ``velocity`` target, per unit of ``tau / T``: ``(y_e - x_s) T / (tau_e - tau_s)``.

    ``tau`` decreases towards data, so this is minus the core velocity ``(y_e - x_s) / (t_e - t_s)``.
    """
    return (y_e - x_s) * _expand(num_train_timesteps / (tau_e - tau_s), x_s)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor):
    """Deterministic DDIM: ``x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)``,
    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps``; ``abar_*: (B,)``."""
    x0 = (x - _expand((1 - abar_t).sqrt(), x) * eps) / _expand(abar_t.sqrt(), x)
    return _expand(abar_prev.sqrt(), x) * x0 + _expand((1 - abar_prev).sqrt(), x) * eps


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EpsWindowConfig:
    """PeRFlow for an eps-model: ``K`` windows, the student's ``prediction_type`` and the teacher's
    ``M`` DDIM steps per window (``discrete_teacher``: round interior SD times to integers, so the
    teacher sees table timesteps only; window boundaries are integers since ``K`` divides ``T``)."""

    schedule: VPSchedule = field(default_factory=VPSchedule)
    num_windows: int = 4
    prediction_type: str = "diff_eps"
    teacher_steps: int = 8
    discrete_teacher: bool = True

    def __post_init__(self) -> None:
        if self.num_windows < 1:
            raise InvalidParameter("num_windows", self.num_windows, "K must be >= 1")
        if self.schedule.num_train_timesteps % self.num_windows:
            raise InvalidParameter("num_windows", self.num_windows,
                                   f"K must divide num_train_timesteps={self.schedule.num_train_timesteps}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InvalidParameter("prediction_type", self.prediction_type, f"one of {PREDICTION_TYPES}")
        if self.teacher_steps < 1:
            raise InvalidParameter("teacher_steps", self.teacher_steps, "M must be >= 1")


# ---------------------------------------------------------------------------------- teacher, target
def timestep_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the timesteps handed to a UNet: at least float32, whatever the activations'
    (bf16 holds only multiples of 4 between 512 and 1024; the UNet's time embedding takes float32)."""
    return torch.promote_types(activation_dtype, torch.float32)


@torch.no_grad()
def teacher_window_solve(
    eps_model: EpsModel,
    x_s: torch.Tensor,
    k: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_windows: int,
    steps: int,
    discrete: bool = True,
    **cond,
) -> torch.Tensor:
    """``y_e``: ``M = steps`` DDIM steps of the teacher from ``x_s: (B, ...)`` at the start of windows
    ``k: (B,)`` to their ends, on the uniform SD-time grid ``tau_j = tau_s + j (tau_e - tau_s) / M``
    (rounded to integers when ``discrete``). ``eps_model(x, index, **cond)`` gets the table index
    ``tau_j - 1`` in ``timestep_dtype(x.dtype)`` (at least float32)."""
    T = len(alphas_cumprod)
    tau_s, tau_e = window_bounds_tau(k.to(x_s.device), num_windows, T)
    j = torch.arange(steps + 1, dtype=torch.float64, device=x_s.device)[:, None]
    grid = tau_s + j * (tau_e - tau_s) / steps  # (M + 1, B)
    if discrete:
        grid = grid.round()
    x = x_s
    for i in range(steps):
        eps = eps_model(x, table_index(grid[i]).to(timestep_dtype(x.dtype)), **cond)
        x = ddim_step(x, eps, abar_at(alphas_cumprod, grid[i]), abar_at(alphas_cumprod, grid[i + 1]))
    return x


def student_target(
    x_s: torch.Tensor, y_e: torch.Tensor, k: torch.Tensor, alphas_cumprod: torch.Tensor,
    num_windows: int, prediction_type: str,
) -> torch.Tensor:
    """The regression target of a student with ``prediction_type`` on window ``k: (B,)``: the eps of
    ``eps_target`` or the ``velocity_target``; constant along the window's segment."""
    if prediction_type == "velocity":
        tau_s, tau_e = window_bounds_tau(k.to(x_s.device), num_windows, len(alphas_cumprod))
        return velocity_target(x_s, y_e, tau_s, tau_e, len(alphas_cumprod))
    abar_s, abar_e = window_abars(alphas_cumprod, k.to(x_s.device), num_windows)
    lam, eta = window_coefficients(abar_s, abar_e, prediction_type)
    return eps_target(x_s, y_e, lam, eta)
