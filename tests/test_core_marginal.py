"""The MA regularizer against closed-form Gaussian KLs (METHOD.md section 4).

An affine student ``v(x, t) = a x + b`` pushes ``N(c, v0 I)`` over a window of length ``T`` to
``N(e^{aT} c + b (e^{aT} - 1) / a, e^{2aT} v0 I)``, so ``R = KL(q || p)`` is closed form for Gaussian
targets. Surrogate gradients and value estimates are quadratic in the start samples, so whitened
samples (empirical mean 0 and covariance I exactly) remove the Monte-Carlo error and leave only the
ODE discretization error: the tolerances below are tight on purpose. With ``logdet="discrete"`` the
``n`` Euler sub-steps are the affine map ``g x + b (g - 1) / a``, ``g = (1 + a T / n)^n``: no ODE error
at all. A nonlinear student (whose divergence depends on ``x``) is checked against central differences
of the batch KL estimate rebuilt from the exact teacher's ``log_prob``; plain (non-whitened) samples
against the closed form within Monte-Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marflow_core import (
    GaussianMixtureTeacher,
    MAConfig,
    TimeMLP,
    euler_map_with_logdet,
    flow_with_logdet,
    ma_surrogate,
    ma_value_estimate,
    uniform_grid,
)
from marflow_core.trajectory import WindowBatch

F64 = torch.float64


class AffineStudent(nn.Module):
    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))
        self.b = nn.Parameter(torch.tensor(b, dtype=F64))

    def forward(self, x, t):
        return self.a * x + self.b


class GaussianTarget:
    """A 'teacher' that only knows the score of N(m, s^2 I) (the surrogate needs nothing else)."""

    def __init__(self, m: torch.Tensor, s: float) -> None:
        self.m, self.s = m, s

    def score(self, x, t):
        return -(x - self.m) / self.s**2

    def velocity(self, x, t):  # pragma: no cover - the surrogate must not need it
        raise AssertionError("ma_surrogate should only use the teacher's score")


def gaussian_kl(mean_q, var_q, mean_p, var_p, dim):
    """KL(N(mean_q, var_q I) || N(mean_p, var_p I)) in ``dim`` dimensions."""
    diff = torch.as_tensor(mean_q - mean_p, dtype=F64).expand(dim)  # scalar means broadcast
    sq = float(diff.pow(2).sum())
    return 0.5 * (dim * var_q / var_p + sq / var_p - dim + dim * math.log(var_p / var_q))


def affine_pushforward(a, b, c, v0, length):
    g = math.exp(a * length)
    return g * c + b * (g - 1) / a, g * g * v0


def whitened(n: int, dim: int, seed: int) -> torch.Tensor:
    """Samples with empirical mean exactly 0 and empirical (1/n) covariance exactly I."""
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def window_batch(x_start, t_start, t_end):
    n = x_start.shape[0]
    ts = torch.full((n,), t_start, dtype=F64)
    te = torch.full((n,), t_end, dtype=F64)
    k = torch.zeros(n, dtype=torch.long)
    return WindowBatch(x_start, x_start, k, 0.5 * (ts + te), ts, te)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_surrogate_gradient_equals_kl_gradient_gaussian_target(dim, divergence):
    """grad_(a, b) L_MA = grad_(a, b) KL(q_1 || N(m, s^2 I)), window [0, 1], start N(0, I).

    For v = a x + b the Jacobian is a I, so a Rademacher Hutchinson probe is exact as well.
    """
    a0, b0, s = 0.3, -0.4, 1.7
    m = torch.tensor([1.0, -0.5, 0.25][:dim], dtype=F64)
    student = AffineStudent(a0, b0)
    x0 = whitened(512, dim, seed=dim)
    cfg = MAConfig(weight=1.0, substeps=16, solver="rk4", divergence=divergence,
                   normalize_by_dim=False)
    loss = ma_surrogate(student, GaussianTarget(m, s), window_batch(x0, 0.0, 1.0), cfg,
                        generator=torch.Generator().manual_seed(0))
    loss.backward()

    def kl(a, b):
        mean, var = affine_pushforward(a, b, torch.zeros(dim, dtype=F64), 1.0, 1.0)
        return gaussian_kl(mean, var, m, s**2, dim)

    h = 1e-5
    grad_a = (kl(a0 + h, b0) - kl(a0 - h, b0)) / (2 * h)
    grad_b = (kl(a0, b0 + h) - kl(a0, b0 - h)) / (2 * h)
    assert abs(grad_a) > 0.1 and abs(grad_b) > 0.1  # not at a stationary point
    assert float(student.a.grad) == pytest.approx(grad_a, rel=1e-7, abs=1e-8)
    assert float(student.b.grad) == pytest.approx(grad_b, rel=1e-7, abs=1e-8)


@pytest.mark.parametrize(("t_start", "t_end"), [(0.0, 1.0), (0.25, 0.5), (0.75, 1.0)])
def test_surrogate_gradient_on_a_window_of_the_exact_teacher(t_start, t_end):
    """One-component exact teacher: p_t = N(t mu, (t^2 sigma^2 + (1 - t)^2) I); start x ~ p_{t_k}.

    Also checks ``normalize_by_dim`` (divides by D) and ``window_weights`` (multiplies by w_k).
    """
    mu, sigma, dim = torch.tensor([1.5, -0.5], dtype=F64), 0.6, 2
    teacher = GaussianMixtureTeacher([1.0], [mu.tolist()], [sigma], dtype=F64)

    def var(t):
        return t**2 * sigma**2 + (1 - t) ** 2

    a0, b0 = -0.2, 0.35
    student = AffineStudent(a0, b0)
    x = t_start * mu + math.sqrt(var(t_start)) * whitened(512, dim, seed=7)
    wb = window_batch(x, t_start, t_end)
    wb.k[:] = 1
    cfg = MAConfig(weight=1.0, substeps=8, solver="rk4", normalize_by_dim=True,
                   window_weights=[0.0, 2.5])
    ma_surrogate(student, teacher, wb, cfg).backward()

    def kl(a, b):
        mean, v = affine_pushforward(a, b, t_start * mu, var(t_start), t_end - t_start)
        return gaussian_kl(mean, v, t_end * mu, var(t_end), dim)

    h = 1e-5
    scale = 2.5 / dim
    grad_a = scale * (kl(a0 + h, b0) - kl(a0 - h, b0)) / (2 * h)
    grad_b = scale * (kl(a0, b0 + h) - kl(a0, b0 - h)) / (2 * h)
    assert float(student.a.grad) == pytest.approx(grad_a, rel=1e-7, abs=1e-9)
    assert float(student.b.grad) == pytest.approx(grad_b, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("substeps", [1, 3])
def test_discrete_logdet_surrogate_gradient_equals_kl_of_the_euler_map(substeps):
    """logdet="discrete": n Euler steps of a x + b are the affine map y = g x + b (g - 1) / a with
    g = (1 + a T / n)^n, so the surrogate's gradient is that of the closed-form KL with no ODE error."""
    a0, b0, s, dim, length = 0.3, -0.4, 1.7, 2, 0.5
    m = torch.tensor([1.0, -0.5], dtype=F64)
    student = AffineStudent(a0, b0)
    x0 = whitened(512, dim, seed=5)
    cfg = MAConfig(weight=1.0, substeps=substeps, solver="euler", logdet="discrete",
                   normalize_by_dim=False)
    ma_surrogate(student, GaussianTarget(m, s), window_batch(x0, 0.25, 0.25 + length), cfg).backward()

    def kl(a, b):
        g = (1 + a * length / substeps) ** substeps
        return gaussian_kl(b * (g - 1) / a, g * g, m, s**2, dim)

    h = 1e-6
    grad_a = (kl(a0 + h, b0) - kl(a0 - h, b0)) / (2 * h)
    grad_b = (kl(a0, b0 + h) - kl(a0, b0 - h)) / (2 * h)
    assert float(student.a.grad) == pytest.approx(grad_a, rel=1e-7, abs=1e-9)
    assert float(student.b.grad) == pytest.approx(grad_b, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_surrogate_gradient_nonlinear_student_matches_finite_differences(gmm2d, mode):
    """A nonlinear student (its divergence depends on x, so d div / dx . dx / d theta matters).

    On a fixed batch the surrogate's gradient is the gradient of the batch estimate
    ``mean[-logdet(x) - log p^T_{t_end}(Phi(x))]`` (the KL up to a theta-free term); that estimate
    is rebuilt here from the exact teacher's ``log_prob`` and differentiated by central differences
    along a random parameter direction.
    """
    torch.manual_seed(0)
    student = TimeMLP(2, 16, 2, time_dim=8).double()
    x = gmm2d.sample(64, 0.25, torch.Generator().manual_seed(1))
    wb = window_batch(x, 0.25, 0.5)
    if mode == "continuous":
        cfg = MAConfig(substeps=4, solver="rk4", normalize_by_dim=False)
    else:
        cfg = MAConfig(substeps=3, solver="euler", logdet="discrete", normalize_by_dim=False)
    ma_surrogate(student, gmm2d, wb, cfg).backward()
    params = list(student.parameters())
    gen = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))
    grid = uniform_grid(0.25, 0.5, cfg.substeps, x)

    def estimate() -> float:
        if mode == "continuous":
            flow = flow_with_logdet(student, x, grid, "rk4", "exact")
        else:
            flow = euler_map_with_logdet(student, x, grid)
        return float((-flow.logdet - gmm2d.log_prob(flow.x, 0.5)).mean())

    def shifted(sign: float, eps: float = 1e-6) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
        value = estimate()
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    fd = (shifted(1.0) - shifted(-1.0)) / 2e-6
    assert abs(fd) > 1e-3  # a real slope, not a stationary direction
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_surrogate_gradient_monte_carlo_with_plain_samples():
    """Without whitening the gradient is an MC estimate: within 5 standard errors of the exact one."""
    a0, b0, s, dim, n = 0.3, -0.4, 1.7, 2, 20_000
    m = torch.tensor([1.0, -0.5], dtype=F64)
    x0 = torch.randn(n, dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    cfg = MAConfig(weight=1.0, substeps=8, solver="rk4", normalize_by_dim=False)
    # the surrogate is a batch mean: 20 independent chunk gradients give the estimate and its error
    chunks = []
    for chunk in x0.split(1_000):
        student = AffineStudent(a0, b0)
        ma_surrogate(student, GaussianTarget(m, s), window_batch(chunk, 0.0, 1.0), cfg).backward()
        chunks.append((float(student.a.grad), float(student.b.grad)))
    chunks = torch.tensor(chunks, dtype=F64)
    est, se = chunks.mean(0), chunks.std(0) / math.sqrt(len(chunks))

    def kl(a, b):
        mean, var = affine_pushforward(a, b, torch.zeros(dim, dtype=F64), 1.0, 1.0)
        return gaussian_kl(mean, var, m, s**2, dim)

    h = 1e-5
    exact = torch.tensor([(kl(a0 + h, b0) - kl(a0 - h, b0)) / (2 * h),
                          (kl(a0, b0 + h) - kl(a0, b0 - h)) / (2 * h)], dtype=F64)
    assert torch.all((est - exact).abs() < 5 * se), (est, exact, se)
    assert torch.all((est - exact).abs() < 0.05 * exact.abs())


@pytest.mark.parametrize(("t_start", "t_end"), [(0.0, 1.0), (0.25, 0.5)])
def test_value_estimate_equals_closed_form_kl(t_start, t_end):
    """Estimator (A): E int [-div delta - s_T . delta] ds = KL(q_{t_end} || p^T_{t_end})."""
    mu, sigma, dim = torch.tensor([1.5, -0.5, 0.8], dtype=F64), 0.5, 3
    teacher = GaussianMixtureTeacher([1.0], [mu.tolist()], [sigma], dtype=F64)

    def var(t):
        return t**2 * sigma**2 + (1 - t) ** 2

    a, b = 0.4, 0.7
    x = t_start * mu + math.sqrt(var(t_start)) * whitened(256, dim, seed=11)
    value = ma_value_estimate(AffineStudent(a, b), teacher, x, t_start, t_end, substeps=64, solver="rk4")
    assert value.shape == (256,)
    mean, v = affine_pushforward(a, b, t_start * mu, var(t_start), t_end - t_start)
    expected = gaussian_kl(mean, v, t_end * mu, var(t_end), dim)
    assert expected > 0.05
    assert float(value.mean()) == pytest.approx(expected, rel=1e-6)


def test_value_estimate_zero_for_the_teacher_itself(gmm2d):
    x = gmm2d.sample(64, 0.25, torch.Generator().manual_seed(0))
    value = ma_value_estimate(gmm2d.velocity, gmm2d, x, 0.25, 0.5, substeps=4)
    torch.testing.assert_close(value, torch.zeros(64, dtype=F64), rtol=0, atol=1e-12)


def test_value_estimate_hutchinson_matches_exact_for_isotropic_jacobian():
    """delta's Jacobian is (a - g(t)) I for a one-component teacher: Rademacher probes are exact."""
    teacher = GaussianMixtureTeacher([1.0], [[1.0, 2.0]], [0.7], dtype=F64)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    student = AffineStudent(0.2, -0.3)
    exact = ma_value_estimate(student, teacher, x, 0.0, 1.0, substeps=16)
    hutch = ma_value_estimate(student, teacher, x, 0.0, 1.0, substeps=16, divergence="hutchinson",
                              generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hutch, exact, rtol=1e-10, atol=1e-12)


def test_ma_config_validation():
    for bad in [dict(weight=-1.0), dict(substeps=0), dict(solver="dopri5"), dict(divergence="x"),
                dict(n_probes=0), dict(probe_kind="uniform"), dict(every=0),
                dict(window_weights=[1.0, -1.0]), dict(logdet="exact"),
                dict(logdet="discrete", solver="rk4")]:
        with pytest.raises(ValueError):
            MAConfig(**bad)


def test_window_weights_too_short_raises():
    x = whitened(8, 2, seed=0)
    wb = window_batch(x, 0.0, 0.5)
    wb.k[:] = 3
    with pytest.raises(ValueError):
        ma_surrogate(AffineStudent(0.1, 0.1), GaussianTarget(torch.zeros(2, dtype=F64), 1.0), wb,
                     MAConfig(window_weights=[1.0, 1.0]))
