"""The MA variants against closed forms: the discrete log-det at D > 2 with a full (non-isotropic)
linear student, the optimum each variant drives a 1-D scale to, and the last window ending at the
teacher's score time.

A linear student ``v(x) = A x + b`` makes every ``n``-step Euler map affine, ``y = M x + c`` with
``M = (I + h A)^n``, ``c = sum_{i<n} (I + h A)^i h b``; on whitened samples (empirical mean 0,
covariance I) the surrogate's gradient is then exactly the gradient of the closed-form
``KL(N(c, M M^T) || N(m, s^2 I))``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_core_marginal import F64, GaussianTarget, whitened, window_batch
from torch import nn

from marflow_core import MAConfig, ma_surrogate
from marflow_core.teachers import VelocityTeacher


class LinearStudent(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x, t):
        return x @ self.a.T + self.b


def euler_affine(a: torch.Tensor, b: torch.Tensor, length: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, c)`` of ``n`` Euler steps of ``A x + b`` over ``length``."""
    h = length / n
    step = torch.eye(len(b), dtype=F64) + h * a
    m, c = torch.eye(len(b), dtype=F64), torch.zeros_like(b)
    for _ in range(n):
        m, c = step @ m, step @ c + h * b
    return m, c


def kl_to_isotropic(mean: torch.Tensor, cov: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    """``KL(N(mean, cov) || N(m, s^2 I))``."""
    d = len(mean)
    return 0.5 * (torch.trace(cov) / s**2 + (mean - m).pow(2).sum() / s**2 - d
                  + d * math.log(s**2) - torch.logdet(cov))


@pytest.mark.parametrize("substeps", [1, 2])
def test_discrete_logdet_gradient_at_d5_with_a_full_linear_student(substeps):
    dim, length, s = 5, 0.25, 1.3
    gen = torch.Generator().manual_seed(3)
    a0 = 0.6 * torch.randn(dim, dim, generator=gen, dtype=F64)
    b0 = torch.randn(dim, generator=gen, dtype=F64)
    m = torch.randn(dim, generator=gen, dtype=F64)
    student = LinearStudent(a0, b0)
    cfg = MAConfig(weight=1.0, substeps=substeps, solver="euler", logdet="discrete", normalize_by_dim=False)
    ma_surrogate(student, GaussianTarget(m, s), window_batch(whitened(256, dim, 7), 0.75, 0.75 + length),
                 cfg).backward()

    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    mat, c = euler_affine(a, b, length, substeps)
    kl_to_isotropic(c, mat @ mat.T, m, s).backward()  # x ~ N(0, I): y ~ N(c, M M^T)
    assert torch.allclose(student.a.grad, a.grad, rtol=1e-8, atol=1e-10)
    assert torch.allclose(student.b.grad, b.grad, rtol=1e-8, atol=1e-10)


def _optimal_scale(logdet: str, sigma0: float, sigma_p: float, length: float = 0.5) -> float:
    """The map gain ``g = 1 + h a`` at which the 1-step MA surrogate of ``v = a x`` is stationary,
    for ``x ~ N(0, sigma0^2)`` and the teacher ``N(0, sigma_p^2)``: bisection on the surrogate's
    gradient in ``a`` (increasing: the surrogate is convex in ``a`` for ``g > 0``)."""
    x = sigma0 * whitened(512, 1, 11)
    extra = {"divergence": "exact"} if logdet == "continuous" else {}
    cfg = MAConfig(weight=1.0, substeps=1, solver="euler", logdet=logdet, normalize_by_dim=False, **extra)
    target = GaussianTarget(torch.zeros(1, dtype=F64), sigma_p)

    def gradient(gain: float) -> float:
        student = LinearStudent(torch.full((1, 1), (gain - 1) / length, dtype=F64), torch.zeros(1, dtype=F64))
        ma_surrogate(student, target, window_batch(x, 0.0, length), cfg).backward()
        return float(student.a.grad)

    lo, hi = 1e-3, 20.0
    assert gradient(lo) < 0 < gradient(hi)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gradient(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize(("sigma0", "sigma_p"), [(1.0, 0.5), (1.0, 2.0), (0.8, 0.3)])
def test_the_discrete_variant_drives_the_gain_to_the_true_ratio_the_continuous_one_squares_it(sigma0, sigma_p):
    """One Euler sub-step: the sampler's map is ``y = g x`` and it needs ``g = sigma_p / sigma0``.
    ``discrete`` charges the sampler's ``log|g|`` and reaches it; ``continuous`` charges ``h a =
    g - 1 >= log g`` (contraction under-charged) and settles at ``g = (sigma_p / sigma0)^2``."""
    ratio = sigma_p / sigma0
    assert _optimal_scale("discrete", sigma0, sigma_p) == pytest.approx(ratio, rel=1e-8)
    assert _optimal_scale("continuous", sigma0, sigma_p) == pytest.approx(ratio**2, rel=1e-8)


def test_the_last_window_ends_where_the_teacher_is_scored():
    """With a score cutoff ``t_max`` below a window's end, the MA term integrates the student to
    ``t_max`` and scores there: the surrogate on ``[0.75, 1]`` equals the one on ``[0.75, t_max]``
    (same sub-steps), and its gradient is that of the closed-form KL at ``t_max``."""
    sigma, t_max, dim = 0.7, 0.9, 3

    def velocity(x, t):  # rectified flow of N(0, I) -> N(0, sigma^2 I): v = x (t sigma^2 - (1-t)) / var_t
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - tt) ** 2 + tt**2 * sigma**2
        return x * (tt * sigma**2 - (1 - tt)) / var

    teacher = VelocityTeacher(velocity, t_max=t_max)
    x = whitened(256, dim, 2) * 0.4
    cfg = MAConfig(weight=1.0, substeps=2, solver="euler", logdet="discrete", normalize_by_dim=False)
    a0, b0 = -0.3 * torch.eye(dim, dtype=F64), torch.zeros(dim, dtype=F64)
    full, cut = LinearStudent(a0, b0), LinearStudent(a0, b0)
    value_full = ma_surrogate(full, teacher, window_batch(x, 0.75, 1.0), cfg)
    value_cut = ma_surrogate(cut, teacher, window_batch(x, 0.75, t_max), cfg)
    assert float(value_full) == pytest.approx(float(value_cut), rel=1e-12)
    value_full.backward()

    a = a0.clone().requires_grad_(True)
    mat, c = euler_affine(a, b0, t_max - 0.75, 2)
    var_t = (1 - t_max) ** 2 + t_max**2 * sigma**2
    kl_to_isotropic(c, 0.16 * mat @ mat.T, torch.zeros(dim, dtype=F64), math.sqrt(var_t)).backward()
    assert torch.allclose(full.a.grad, a.grad, rtol=1e-8, atol=1e-10)
