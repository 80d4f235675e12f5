"""``KL(student || teacher)`` for image-sized flows: the student's exact few-step log-density against
the teacher's continuous-normalizing-flow (CNF) log-density.

Conventions (docs/method.md, section 1): ``t = 0`` is noise ``N(0, I)``, ``t = 1`` is data; ``x: (B, ...)``
with ``D = prod(x.shape[1:])`` (``(B, D)`` flat vectors, or images with a ``FlatField`` around the net).

Student (exact, as on the 2-D tier). The few-step Euler sampler ``x_{n+1} = x_n + h_n v(x_n, t_n)`` on
the grid of ``sample_few_step`` is a composition of maps with Jacobians ``I + h_n J_v(x_n, t_n)``, so

    log q(x_N) = log N(x_0; 0, I) - sum_n log|det(I + h_n J_v(x_n, t_n))|

exactly (``marflow_core.euler_map_with_logdet``: ``D`` batched VJPs and ``slogdet`` per step). A step
with ``det <= 0`` folds space; a sample with at least one such step is counted as folded (as the 2-D
tier counts), and its ``log q`` keeps one preimage only (a lower bound on the true ``log q``).

Teacher (CNF). Solving the teacher ODE backwards from ``x_1 = x`` at ``t = 1`` to ``x_0`` at ``t = 0``
with the augmented state ``dL/ds = div v_T(x_s, s)`` gives ``L = int_1^0 div = -int_0^1 div``, so

    log p_1(x) = log N(x_0; 0, I) - int_0^1 div v_T(x_t, t) dt = log N(x_0; 0, I) + L

(``marflow_core.flow_with_logdet`` with a descending grid). ``div`` is the exact trace (small ``D``) or
Hutchinson's ``e^T (dv/dx) e`` with probes fixed over the whole path, so that each probe group's ``L``
is an unbiased estimate of the discretised integral; ``G`` independent probe groups give the
per-sample Monte-Carlo standard error.

``KL(q || p) = E_q[log q - log p]`` is the Monte-Carlo mean over the student's samples. Its error
budget is in ``kl_student_teacher``. The log-determinants accumulate in float64 (``float64_logdet``):
the network runs in the input's dtype, only the state and the ``slogdet`` are promoted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from marflow_core import TimeWindows, euler_map_with_logdet, flow_with_logdet, uniform_grid
from marflow_core.models import VelocityField
from marflow_core.seeding import stream
from replication.common.stats import mc_mean, standard_normal_log_prob

#: named random stream (child of ``kl_student_teacher``'s ``seed``) of the teacher's Hutchinson probes
PROBES = "kl-probes"


class FlatField(nn.Module):
    """``v(x, t)`` on flat vectors ``x: (B, D)`` of a field on ``(B, *sample_shape)``, ``D = prod(shape)``."""

    def __init__(self, field: VelocityField, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.field, self.sample_shape = field, tuple(sample_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.field(x.view(x.shape[0], *self.sample_shape), t).reshape(x.shape[0], -1)


class _PromotedState(nn.Module):
    """Runs ``field`` in ``compute_dtype`` on a state of another dtype (float64 here) and returns the
    velocity in the state's dtype, so that Jacobians, log-determinants and the state accumulate in
    float64 while the network keeps its own precision. Autograd casts the cotangents both ways."""

    def __init__(self, field: VelocityField, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.field, self.compute_dtype = field, compute_dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.field(x.to(self.compute_dtype), t.to(self.compute_dtype)).to(x.dtype)


def _promoted(field: VelocityField, x: torch.Tensor, float64_logdet: bool) -> tuple[VelocityField, torch.Tensor]:
    """``(field, x)`` to integrate: promoted to a float64 state when asked and ``x`` is not float64."""
    if not float64_logdet or x.dtype == torch.float64:
        return field, x
    return _PromotedState(field, x.dtype), x.to(torch.float64)


def _chunks(n: int, chunk: int) -> list[slice]:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


@dataclass
class StudentLogQ:
    """The student's few-step samples ``x: (B, ...)``, exact ``log_q: (B,)`` (float64 when promoted)
    and ``n_folds``: samples with at least one step of ``det(I + h J) <= 0``. Unpacks as
    ``(x, log_q, n_folds)``."""

    x: torch.Tensor
    log_q: torch.Tensor
    n_folds: int

    def __iter__(self):
        return iter((self.x, self.log_q, self.n_folds))


@torch.no_grad()
def student_logq(
    model: VelocityField,
    x0: torch.Tensor,
    grid: torch.Tensor,
    chunk: int = 64,
    float64_logdet: bool = True,
) -> StudentLogQ:
    """The few-step Euler sampler from ``x0: (B, ...) ~ N(0, I)`` over ``grid: (N + 1,)`` and its exact
    log-density ``log q(x_N) = log N(x0; 0, I) - sum_n log|det(I + h_n J_v(x_n, t_n))|``.

    ``grid`` is the sampler's (``few_step_grid``: what ``sample_few_step`` uses for ``N`` NFE over
    ``K`` windows). Per step the ``(b, D, D)`` Jacobian of a chunk of ``b`` samples comes from one
    batched VJP over the ``D`` basis vectors (``batch_jacobian`` inside ``euler_map_with_logdet``; no
    loop over samples), then ``slogdet``; ``chunk`` bounds memory at about ``chunk * D`` simultaneous
    backward passes. Returns ``x_N`` in ``x0``'s dtype, ``log_q`` in float64 when ``float64_logdet``
    (the state and the determinants are promoted; the network runs in ``x0``'s dtype).
    """
    xs, log_qs, n_folds = [], [], 0
    for part in _chunks(x0.shape[0], chunk):
        field, x = _promoted(model, x0[part], float64_logdet)
        flow = euler_map_with_logdet(field, x, grid.to(dtype=x.dtype, device=x.device))
        xs.append(flow.x.to(x0.dtype))
        log_qs.append(standard_normal_log_prob(x) - flow.logdet)
        n_folds += flow.n_folded
    return StudentLogQ(torch.cat(xs), torch.cat(log_qs), n_folds)


@dataclass
class TeacherLogP:
    """``logp: (B,)`` the teacher's CNF ``log p_1`` at the points and ``se: (B,)`` its per-sample
    Hutchinson standard error (0 for the exact trace, NaN for one probe group). Unpacks as
    ``(logp, se)``."""

    logp: torch.Tensor
    se: torch.Tensor

    def __iter__(self):
        return iter((self.logp, self.se))


@torch.no_grad()
def teacher_logp(
    teacher_velocity: VelocityField,
    x: torch.Tensor,
    n_steps: int = 16,
    method: str = "rk4",
    probes: int = 1,
    generator: torch.Generator | None = None,
    groups: int = 2,
    divergence: str = "hutchinson",
    probe_kind: str = "rademacher",
    chunk: int = 64,
    float64_logdet: bool = True,
) -> TeacherLogP:
    """The teacher's CNF log-density of ``x: (B, ...)`` at ``t = 1``:
    ``log p_1(x) = log N(x_0; 0, I) - int_0^1 div v_T(x_t, t) dt``, by ``n_steps`` fixed steps of
    ``method`` (``euler``, ``heun``, ``rk4``, ``rk4_38``) from ``t = 1`` back to ``t = 0``
    (``flow_with_logdet`` on a descending grid; its ``logdet`` is ``int_1^0 div = -int_0^1 div``).

    ``divergence="exact"``: the exact trace (``D`` VJPs per evaluation; small ``D``), ``se = 0``.
    ``divergence="hutchinson"``: ``groups`` (``G``) independent groups of ``probes`` (``P``)
    ``probe_kind`` probes per sample, each group fixed over the whole path, so each group's integral
    ``L_g`` is an unbiased estimate of the discretised ``int div``. ``logp = log N(x_0) - mean_g L_g``
    and ``se = sd_g(L_g) / sqrt(G)`` (NaN when ``G = 1``). The ``G`` groups run as one batch of
    ``G * b`` rows (``x`` repeated), i.e. ``G`` forward and ``G * P`` VJP passes per evaluation.
    ``generator`` draws the probes (chunk by chunk, in order). ``chunk`` samples at a time.
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    g = 1 if divergence == "exact" else groups
    logps, ses = [], []
    for part in _chunks(x.shape[0], chunk):
        field, xb = _promoted(teacher_velocity, x[part], float64_logdet)
        b = xb.shape[0]
        grid = uniform_grid(1.0, 0.0, n_steps, xb)
        flow = flow_with_logdet(field, xb.repeat(g, *([1] * (xb.ndim - 1))), grid, method, divergence,
                                probes, probe_kind, generator=generator)
        neg_integral = flow.logdet.view(g, b)  # L_g = int_1^0 div = -int_0^1 div, per group
        logps.append(standard_normal_log_prob(flow.x[:b]) + neg_integral.mean(0))
        if divergence == "exact":
            ses.append(torch.zeros(b, dtype=neg_integral.dtype, device=neg_integral.device))
        elif g == 1:
            ses.append(torch.full((b,), math.nan, dtype=neg_integral.dtype, device=neg_integral.device))
        else:
            ses.append(neg_integral.std(0) / math.sqrt(g))
    return TeacherLogP(torch.cat(logps), torch.cat(ses))


@dataclass
class KLEstimate:
    """``KL(q || p)`` of a few-step student ``q`` against the teacher's CNF density ``p_1``.

    ``kl`` and ``stderr`` (total); ``hutchinson_stderr`` and ``sample_stderr`` its two parts
    (``stderr^2 = sample_stderr^2 + hutchinson_stderr^2``, see ``kl_student_teacher``); ``n_samples``;
    ``fold_fraction`` (samples whose sampler folded at some step: their ``log q`` is a lower bound);
    ``seconds`` spent (``student_seconds`` + ``teacher_seconds``); the settings; per-sample
    ``log_q``, ``log_p`` (float64 when promoted).
    """

    kl: float
    stderr: float
    sample_stderr: float
    hutchinson_stderr: float
    n_samples: int
    fold_fraction: float
    seconds: float
    student_seconds: float
    teacher_seconds: float
    nfe: int
    teacher_steps: int
    teacher_method: str
    divergence: str
    probes: int
    groups: int
    log_q: torch.Tensor = field(repr=False)
    log_p: torch.Tensor = field(repr=False)

    def __str__(self) -> str:
        return (f"KL = {self.kl:.4f} ± {self.stderr:.4f} (Hutchinson part {self.hutchinson_stderr:.4f}; "
                f"n = {self.n_samples}, folded {self.fold_fraction:.3f}, {self.seconds:.1f} s)")


def kl_student_teacher(
    student: VelocityField,
    teacher_velocity: VelocityField,
    x0: torch.Tensor,
    windows: TimeWindows,
    nfe: int,
    teacher_steps: int = 16,
    teacher_method: str = "rk4",
    probes: int = 1,
    groups: int = 2,
    divergence: str = "hutchinson",
    probe_kind: str = "rademacher",
    seed: int = 0,
    chunk: int = 64,
    float64_logdet: bool = True,
    progress: bool = False,
) -> KLEstimate:
    """``KL(q || p) = E_q[log q - log p_1]`` over the student's ``nfe``-step samples from ``x0: (B, ...)``.

    Per sample ``d_i = log q(x_N^i) - log p_hat(x_N^i)``: ``log q`` exact (``student_logq`` on the
    grid of ``sample_few_step``: ``windows.step_grid(nfe, strict=False)``), ``log p_hat`` the teacher's
    CNF estimate (``teacher_logp``; Hutchinson probes from ``stream(seed, PROBES, chunk_index)``, so
    the probes, and the estimate, depend on ``seed`` and ``chunk``). ``kl = mean_i d_i``.

    Error budget. The probes are independent across samples and ``log p_hat`` is unbiased for the
    discretised ``log p`` given ``x``, so the ``d_i`` are i.i.d. with mean the KL and, by the law of
    total variance, ``Var d = Var_x[log q - log p] + E_x[sigma_H^2(x)]`` (``sigma_H^2``: the
    Hutchinson variance at ``x``). Hence ``stderr = sd(d) / sqrt(n)`` already contains both parts
    (adding the per-sample Hutchinson errors again would count them twice). Its Hutchinson part is
    estimated from the per-sample errors, ``hutchinson_stderr = sqrt(mean_i se_i^2 / n)``, and the
    sampling part is ``sample_stderr = sqrt(max(stderr^2 - hutchinson_stderr^2, 0))``. Not in the
    error: the teacher's ODE discretisation (``teacher_steps``) and the lower-bound ``log q`` of folded
    samples (``fold_fraction``). ``progress`` shows a tqdm bar over the chunks.
    """
    grid = windows.step_grid(nfe, strict=False)
    parts = _chunks(x0.shape[0], chunk)
    log_q, log_p, se, n_folds = [], [], [], 0
    student_seconds = teacher_seconds = 0.0
    for index, part in enumerate(tqdm(parts, desc="KL(student||teacher)", disable=not progress)):
        tic = time.perf_counter()
        xs, lq, folds = student_logq(student, x0[part], grid, chunk, float64_logdet)
        toc = time.perf_counter()
        lp, s = teacher_logp(teacher_velocity, xs, teacher_steps, teacher_method, probes,
                             stream(seed, PROBES, index), groups, divergence, probe_kind, chunk,
                             float64_logdet)
        student_seconds += toc - tic
        teacher_seconds += time.perf_counter() - toc
        log_q.append(lq)
        log_p.append(lp)
        se.append(s)
        n_folds += folds
    lq_all, lp_all, se_all = torch.cat(log_q), torch.cat(log_p), torch.cat(se)
    n = lq_all.shape[0]
    total = mc_mean(lq_all - lp_all)
    hutchinson = math.sqrt(float(se_all.pow(2).mean()) / n)
    return KLEstimate(
        kl=total.value, stderr=total.stderr, hutchinson_stderr=hutchinson,
        sample_stderr=math.sqrt(max(total.stderr**2 - hutchinson**2, 0.0)),
        n_samples=n, fold_fraction=n_folds / n, seconds=student_seconds + teacher_seconds,
        student_seconds=student_seconds, teacher_seconds=teacher_seconds, nfe=nfe,
        teacher_steps=teacher_steps, teacher_method=teacher_method, divergence=divergence,
        probes=probes if divergence == "hutchinson" else 0,
        groups=groups if divergence == "hutchinson" else 1, log_q=lq_all, log_p=lp_all)
