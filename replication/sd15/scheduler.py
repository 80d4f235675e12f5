"""A diffusers scheduler for piecewise-straight students (docs/method.md, section 7).

``PeRFlowScheduler`` takes the config keys of the published PeRFlow scheduler, so that a published
``scheduler_config.json`` loads with ``from_config`` / ``from_pretrained`` and samples the same
trajectory, and it plugs into any diffusers pipeline (``set_timesteps``, ``step``,
``scale_model_input``, ``add_noise``, ``init_noise_sigma``, ``order``). Every coefficient comes from
``replication.sd15.vp``.

Sampling with ``N >= K`` steps: window ``i`` (from the noise end) gets ``N // K`` steps, plus one
for the first ``N % K`` windows; its timesteps are ``floor(T * linspace(start, end, n, endpoint=False))``
in SD time (``1000, 750, 500, 250`` for ``N = K = 4``; truncated as in the published scheduler). A
step at SD time ``tau_c`` of window ``[tau_s, tau_e]`` predicts the window end ``y`` and moves along
the straight line to the next timestep ``tau_n`` (``0`` after the last):

- eps types: ``(lambda, eta)`` of the window, moved to the current point by ``segment_coefficients``;
  ``y = lambda_r x + eta_r eps``; velocity ``v = (y - x) T / (tau_e - tau_c)``;
- ``velocity``: ``v`` is the model output (``d x / d(tau / T)``, PeRFlow's convention);

then ``x_next = x + (tau_n - tau_c) / T * v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from marflow_core.errors import InvalidParameter

from .vp import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    abar_at,
    alphas_cumprod_from_betas,
    make_betas,
    segment_coefficients,
    velocity_target,
    vp_marginal,
    window_bounds_tau,
    window_coefficients,
    window_end_from_eps,
    window_index_of_tau,
)


@dataclass
class PeRFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next timestep; ``pred_window_end``: the predicted end of
    the current window (``None`` for ``velocity``); ``pred_original_sample`` is always ``None``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    pred_window_end: torch.Tensor | None = None


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Few-step sampler of a PeRFlow student with ``num_time_windows`` equal windows.

    ``prediction_type``: ``diff_eps``, ``ddim_eps`` or ``velocity``. ``t_noise`` / ``t_clean`` must be
    1 / 0 (the only values the published scheduler splits into equal windows). ``set_alpha_to_one``
    only sets ``final_alpha_cumprod`` (the value a teacher DDIM step past index 0 would use); the
    windows use ``alphas_cumprod[0]`` at the clean end, as published.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        set_alpha_to_one: bool = False,
        prediction_type: str = "ddim_eps",
        t_noise: float = 1,
        t_clean: float = 0,
        num_time_windows: int = 4,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise InvalidParameter("prediction_type", prediction_type,
                                   f"unsupported; PeRFlowScheduler supports {PREDICTION_TYPES}")
        if num_time_windows < 1 or num_train_timesteps % num_time_windows:
            raise InvalidParameter("num_time_windows", num_time_windows,
                                   f"must be >= 1 and divide num_train_timesteps={num_train_timesteps}")
        if (t_noise, t_clean) != (1, 0):
            raise InvalidParameter("t_noise, t_clean", (t_noise, t_clean), "only (1, 0) is supported")
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float64)
            if betas.shape != (num_train_timesteps,):
                raise InvalidParameter("trained_betas", f"shape {tuple(betas.shape)}",
                                       f"need ({num_train_timesteps},)")
        elif beta_schedule in BETA_SCHEDULES:
            betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        else:
            raise InvalidParameter("beta_schedule", beta_schedule, f"one of {BETA_SCHEDULES}")
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)  # float64
        self.final_alpha_cumprod = torch.tensor(1.0 if set_alpha_to_one else float(self.alphas_cumprod[0]))
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps, 0, -1)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model input is the sample itself."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``(N,)`` int64 SD timesteps, ``N >= K``; see the module docstring."""
        K, T = self.config.num_time_windows, self.config.num_train_timesteps
        if num_inference_steps < K:
            raise InvalidParameter("num_inference_steps", num_inference_steps,
                                   f"must be >= num_time_windows={K} (at least one step per window)")
        pieces = []
        for i in range(K):
            n = num_inference_steps // K + (1 if i < num_inference_steps % K else 0)
            start, end = (K - i) / K, (K - i - 1) / K
            pieces.append(np.linspace(start, end, num=n, endpoint=False))
        taus = (np.concatenate(pieces) * T).astype(np.int64)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(taus).to(device)

    def _next_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        hits = (self.timesteps.cpu() == timestep.cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {int(timestep)} is not in this scheduler's timesteps "
                             f"{self.timesteps.tolist()} (call set_timesteps first)")
        i = int(hits[0, 0])
        return self.timesteps[i + 1].cpu() if i + 1 < len(self.timesteps) else torch.tensor(0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> PeRFlowSchedulerOutput | tuple[torch.Tensor]:
        """One straight-line step from ``timestep`` to the next one (deterministic; ``generator`` is
        accepted for pipelines that pass it). ``sample, model_output: (B, ...)``."""
        cfg = self.config
        T, K = cfg.num_train_timesteps, cfg.num_time_windows
        tau_c = torch.as_tensor(timestep).reshape(()).to(torch.float64)
        tau_n = self._next_timestep(torch.as_tensor(timestep)).to(torch.float64)
        batch = sample.shape[0]
        tau_c_b = tau_c.expand(batch)
        y = None
        if cfg.prediction_type == "velocity":
            velocity = model_output
        else:
            k = window_index_of_tau(tau_c_b, K, T)
            tau_s, tau_e = window_bounds_tau(k, K, T)
            lam, eta = window_coefficients(abar_at(self.alphas_cumprod, tau_s),
                                           abar_at(self.alphas_cumprod, tau_e), cfg.prediction_type)
            lam_r, eta_r = segment_coefficients(lam, eta, (tau_s - tau_c_b) / (tau_s - tau_e))
            y = window_end_from_eps(sample, model_output, lam_r, eta_r)
            velocity = velocity_target(sample, y, tau_c_b, tau_e, T)
        prev = sample + ((tau_n - tau_c) / T).to(sample.dtype) * velocity
        if not return_dict:
            return (prev,)
        return PeRFlowSchedulerOutput(prev_sample=prev, pred_window_end=y)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """``sqrt(abar(tau)) x + sqrt(1 - abar(tau)) noise`` at SD times ``timesteps: (B,)``."""
        tau = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1).to(torch.float64)
        tau = tau.expand(original_samples.shape[0]) if tau.numel() == 1 else tau
        return vp_marginal(original_samples, noise, abar_at(self.alphas_cumprod, tau))

    def __len__(self) -> int:
        return self.config.num_train_timesteps


#: the noise-schedule keys a PeRFlow scheduler takes over from another scheduler's config
SCHEDULE_KEYS: tuple[str, ...] = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                  "trained_betas")


def perflow_scheduler_from(config, prediction_type: str, windows: int) -> PeRFlowScheduler:
    """A ``PeRFlowScheduler`` with the noise schedule of another scheduler's ``config`` (a mapping,
    e.g. the teacher's DDPM/DDIM config), ``K = windows`` windows and ``prediction_type``."""
    return PeRFlowScheduler(**{k: config[k] for k in SCHEDULE_KEYS if k in config},
                            prediction_type=prediction_type, t_noise=1, t_clean=0,
                            num_time_windows=windows)
