"""The PeRFlow (+ MA) loss on SD latents: one batch of latents and text embeddings -> a scalar loss.

Time is SD time ``tau`` in ``(0, T]`` (``T = 1000`` is noise; ``replication.sd15.vp``): the student UNet
gets ``tau`` (what PeRFlow's scheduler hands it at sampling), the teacher the table index ``tau - 1``.
Per sample (docs/method.md, section 2):

1. ``tau`` on the grid, its window ``tau_s >= tau > tau_e``; the window start is the noised real latent
   ``x_s = sqrt(abar_s) z + sqrt(1 - abar_s) eps``;
2. the teacher end point ``y_T`` by M DDIM steps of the frozen teacher from ``tau_s`` to ``tau_e``;
3. the student input ``x_t = x_s + (tau - tau_s) / (tau_e - tau_s) (y_T - x_s)``, the target
   ``eps* = (y_T - lambda x_s) / eta`` (``diff_eps`` / ``ddim_eps``) or ``(y_T - x_s) / (tau_e - tau_s)``
   (``velocity``), ``L_TM = mean (unet(x_t, tau) - target)^2``.

MA term (section 4, a reconstruction): the core's ``marflow_core.marginal.ma_surrogate`` in core time
``t = 1 - tau / T`` through three adapters: the student velocity ``v_theta`` (``StudentVelocity``),
the teacher score ``s_T(x, t) = -eps_T(x, tau) / sqrt(1 - abar_tau)`` (``TeacherScore``: the teacher
with the same text and guidance as its window solve) and a ``WindowBatch`` of the window starts and
bounds. The core runs ``n`` sub-steps of the student across each window with the log-det of a
Hutchinson divergence (finite differences or VJP) and returns
``L_MA = mean[-logdet - <sg(s_T(y, t_e)), y>] / d`` (``d = C H W``). The probes are drawn per sample
(``draw_sample_noise``), so a batch split over processes computes what one process computes. The MA
state (path, log-det, score product) is kept in at least float32, also under fp16 mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from marflow_core.marginal import MAConfig, ma_surrogate
from marflow_core.trajectory import WindowBatch

from . import vp
from .config import PeRFlowSD15Config

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep) -> eps


@dataclass
class SampleNoise:
    """Per-sample random draws of one micro-batch (drawn per sample from its own stream, so a batch
    split over processes draws exactly what one process draws for the whole batch)."""

    vae: torch.Tensor        # (B, C, H, W) the draw of the VAE posterior sample
    u: torch.Tensor          # (B,) uniform in [0, 1): the time
    noise: torch.Tensor      # (B, C, H, W) the window-start noise
    keep_text: torch.Tensor  # (B,) bool: False = caption dropped for CFG
    probes: torch.Tensor | None  # (P, B, C, H, W) Hutchinson probes, or None


def draw_sample_noise(generators: list[torch.Generator], latent_shape: tuple[int, ...], cfg_drop: float,
                      n_probes: int, probe_kind: str | None) -> SampleNoise:
    """Draw each sample's randomness from its own CPU generator (``latent_shape`` = (C, H, W))."""
    vae, u, noise, keep, probes = [], [], [], [], []
    for g in generators:
        vae.append(torch.randn(latent_shape, generator=g))
        u.append(torch.rand((), generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        keep.append(torch.rand((), generator=g) >= cfg_drop)
        if probe_kind == "rademacher":
            probes.append(torch.randint(0, 2, (n_probes, *latent_shape), generator=g).float() * 2 - 1)
        elif probe_kind == "gaussian":
            probes.append(torch.randn((n_probes, *latent_shape), generator=g))
    return SampleNoise(torch.stack(vae), torch.stack(u), torch.stack(noise), torch.stack(keep),
                       torch.stack(probes, 1) if probes else None)


@dataclass
class TextConditioning:
    """Embeddings ``(B, 77, C)``: the student's (caption or, where dropped, the empty prompt), and the
    teacher's prompt / empty-prompt pair with its guidance scale."""

    student: torch.Tensor
    teacher: torch.Tensor
    teacher_uncond: torch.Tensor
    teacher_guidance: float


def conditioning(text: torch.Tensor, null: torch.Tensor, keep: torch.Tensor, cfg: PeRFlowSD15Config) -> TextConditioning:
    """CFG-sync: teacher at guidance 1 on the student's dropped prompts; baked: teacher guided on the
    full prompt (``teacher_guidance``) while the student sees the dropped prompt."""
    mask = keep.to(text.dtype)[:, None, None].to(text.device)
    dropped = mask * text + (1 - mask) * null
    if cfg.guidance == "sync":
        return TextConditioning(dropped, dropped, null, 1.0)
    return TextConditioning(dropped, text, null, cfg.teacher_guidance)


def guided_eps(unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> EpsFn:
    """``(x, timestep) -> eps`` of the frozen teacher, with classifier-free guidance when ``guidance > 1``."""

    def eps(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return unet(x, timestep, cond).sample
        both = unet(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([uncond, cond])).sample
        e_u, e_c = both.chunk(2)
        return e_u + guidance * (e_c - e_u)

    return eps


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class StudentVelocity:
    """Core-time velocity ``v_theta(x, t)`` (``t = 1 - tau / T``) of the student inside windows ``k``.

    eps head: the segment point ``x`` at fraction ``r`` of the window predicts the window end
    ``lambda_r x + eta_r eps_theta(x, tau)`` (``vp.segment_coefficients``), so
    ``v = (end - x) / (t_e - t)``, the velocity of PeRFlow's scheduler step; velocity head:
    ``v = -unet(x, tau)`` (PeRFlow's velocity is per unit of ``tau / T``). Takes ``x: (R * B, ...)``
    (finite-difference shifts of a batch of ``B``): the per-sample window and text repeat. The UNet
    gets ``x`` in ``input_dtype`` (default: ``x``'s own) and ``tau`` in at least float32
    (``vp.timestep_dtype``); the velocity comes back in ``x``'s dtype.
    """

    def __init__(self, unet, text: torch.Tensor, k: torch.Tensor, alphas_cumprod: torch.Tensor,
                 windows: int, target: str, input_dtype: torch.dtype | None = None) -> None:
        self.unet, self.text, self.k, self.alphas = unet, text, k, alphas_cumprod
        self.windows, self.target, self.T = windows, target, len(alphas_cumprod)
        self.input_dtype = input_dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        reps = x.shape[0] // self.text.shape[0]
        k = self.k.repeat(reps)
        tau = vp.tau_from_t(t.to(torch.float64), self.T)
        x_in = x if self.input_dtype is None else x.to(self.input_dtype)
        out = self.unet(x_in, tau.to(vp.timestep_dtype(x_in.dtype)),
                        self.text.repeat(reps, 1, 1).to(x_in.dtype)).sample
        if self.target == "velocity":
            return -out.to(x.dtype)
        tau_s, tau_e = vp.window_bounds_tau(k, self.windows, self.T)
        abar_s, abar_e = vp.window_abars(self.alphas, k, self.windows)
        lam, eta = vp.window_coefficients(abar_s, abar_e, self.target)
        lam_r, eta_r = vp.segment_coefficients(lam, eta, (tau - tau_s) / (tau_e - tau_s))
        end = vp.window_end_from_eps(x, out, lam_r, eta_r)
        t_e = vp.t_from_tau(tau_e, self.T)
        return (end - x) / _rows(t_e - t.to(torch.float64), x)


class TeacherScore:
    """The frozen teacher's score in core time: ``s_T(x, t) = -eps_T(x, tau) / sqrt(1 - abar_tau)``
    with ``tau = (1 - t) T``, the eps-model at table index ``tau - 1`` (clamped at 0) with the
    batch's text and guidance. The ``score`` of the core's ``Teacher`` (``ma_surrogate`` reads no
    teacher velocity)."""

    def __init__(self, eps: EpsFn, alphas_cumprod: torch.Tensor) -> None:
        self.eps, self.alphas, self.T = eps, alphas_cumprod, len(alphas_cumprod)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = vp.tau_from_t(t.to(torch.float64), self.T)
        index = vp.table_index(tau).clamp(min=0)
        return vp.teacher_score(self.eps(x, index), vp.abar_at(self.alphas, tau))


class PeRFlowSD15Objective:
    """Turns ``(latents, text, per-sample noise)`` into ``(loss, parts)``; see the module doc.

    ``windows`` K (the student's), ``ma`` the student's MA settings (None: PeRFlow alone);
    ``ma_fd_fp32``: the finite-difference MA passes get float32 inputs (the trainer also turns
    autocast off for them, ``train.ma_context``).
    """

    def __init__(self, teacher_unet, alphas_cumprod: torch.Tensor, perflow: PeRFlowSD15Config,
                 windows: int, ma: MAConfig | None, ma_fd_fp32: bool = True) -> None:
        self.teacher, self.perflow, self.windows, self.ma = teacher_unet, perflow, windows, ma
        self.ma_fd_fp32 = ma_fd_fp32
        self.alphas = alphas_cumprod
        self.T = len(alphas_cumprod)
        self.grid = perflow.discrete_timesteps or self.T

    def teacher_eps(self, cond: TextConditioning) -> EpsFn:
        """``(x, table index) -> eps`` of the frozen teacher with this batch's text and guidance."""
        fn = guided_eps(self.teacher, cond.teacher, cond.teacher_uncond, cond.teacher_guidance)
        return lambda x, index: fn(x.to(cond.teacher.dtype), index.to(vp.timestep_dtype(cond.teacher.dtype))).to(x.dtype)

    def window_sample(self, latents: torch.Tensor, noise: SampleNoise, cond: TextConditioning):
        """``(tau, k, x_s, y_T)``: SD time on the grid (``(0, T]``), window, start, teacher end point."""
        u = noise.u.to(latents.device, torch.float64)
        tau = (1.0 - torch.floor(u * self.grid) / self.grid) * self.T
        k = vp.window_index_of_tau(tau, self.windows, self.T)
        tau_s, _ = vp.window_bounds_tau(k, self.windows, self.T)
        x_s = vp.vp_marginal(latents, noise.noise.to(latents), vp.abar_at(self.alphas, tau_s))
        y_t = vp.teacher_window_solve(self.teacher_eps(cond), x_s, k, self.alphas, self.windows,
                                      self.perflow.teacher_steps)
        return tau, k, x_s, y_t

    def __call__(self, unet, latents: torch.Tensor, noise: SampleNoise, cond: TextConditioning,
                 run_ma: bool, ma_context=None) -> tuple[torch.Tensor, dict[str, float]]:
        tau, k, x_s, y_t = self.window_sample(latents, noise, cond)
        tau_s, tau_e = vp.window_bounds_tau(k, self.windows, self.T)
        x_t = x_s + _rows((tau - tau_s) / (tau_e - tau_s), x_s) * (y_t - x_s)
        target = vp.student_target(x_s, y_t, k, self.alphas, self.windows, self.perflow.target)
        pred = unet(x_t, tau.to(vp.timestep_dtype(x_t.dtype)), cond.student).sample
        tm = (pred.float() - target.float()).pow(2).mean()
        parts = {"tm": float(tm.detach())}
        total = tm
        if run_ma and self.ma is not None and self.ma.weight > 0:
            with ma_context or nullcontext():
                ma_term = self.ma_term(unet, x_s, k, cond, noise.probes)
            parts["ma"] = float(ma_term.detach())
            total = total + self.ma.weight * ma_term
        parts["total"] = float(total.detach())
        return total, parts

    def ma_window_batch(self, x_s: torch.Tensor, k: torch.Tensor) -> WindowBatch:
        """The core ``WindowBatch`` of the MA term: starts ``x_s``, windows ``k`` and their bounds in
        core time (float64). The MA term reads no end point or segment time: ``y_end`` is ``x_s``
        and ``t`` the window start."""
        tau_s, tau_e = vp.window_bounds_tau(k.to(x_s.device), self.windows, self.T)
        t_s, t_e = vp.t_from_tau(tau_s, self.T), vp.t_from_tau(tau_e, self.T)
        return WindowBatch(x_start=x_s, y_end=x_s, k=k.to(x_s.device), t=t_s, t_start=t_s, t_end=t_e)

    def ma_term(self, unet, x_s: torch.Tensor, k: torch.Tensor, cond: TextConditioning,
                probes: torch.Tensor) -> torch.Tensor:
        """``L_MA`` of the batch: ``ma_surrogate`` with this batch's per-sample ``probes``.

        The UNet passes run in float32 with ``ma_fd_fp32`` and finite differences, else in
        ``x_s``'s dtype; the core's state (path, log-det) in at least float32."""
        fp32 = self.ma.divergence == "hutchinson_fd" and self.ma_fd_fp32
        unet_dtype = torch.float32 if fp32 else x_s.dtype
        state_dtype = torch.promote_types(unet_dtype, torch.float32)
        x = x_s.detach().to(state_dtype)
        field = StudentVelocity(unet, cond.student, k, self.alphas, self.windows, self.perflow.target,
                                input_dtype=unet_dtype)
        teacher = TeacherScore(self.teacher_eps(cond), self.alphas)
        return ma_surrogate(field, teacher, self.ma_window_batch(x, k), self.ma,
                            probes=probes.to(x.device, state_dtype))
