"""The MA regularizer against closed-form Gaussian KLs (docs/method.md, section 4).

An affine student ``v(x, t) = a x + b`` pushes ``N(c, v0 I)`` over a window of length ``T`` to
``N(e^{aT} c + b (e^{aT} - 1) / a, e^{2aT} v0 I)``, so ``R = KL(q || p)`` is closed form for Gaussian
targets. Surrogate gradients and value estimates are quadratic in the start samples, so whitened
samples (empirical mean 0 and covariance I exactly) remove the Monte-Carlo error and leave only the
ODE discretization error: the tolerances below are tight on purpose. With ``logdet="discrete"`` the
``n`` Euler sub-steps are the affine map ``g x + b (g - 1) / a``, ``g = (1 + a T / n)^n``: no ODE error
at all. A nonlinear student (whose divergence depends on ``x``) is checked against central differences
of the batch KL estimate rebuilt from the exact teacher's ``log_prob`` and a log-det computed here
(autograd Jacobians of a plain Euler loop / a plain RK4 of ``(x, L)``); plain (non-whitened) samples
against the closed form within Monte-Carlo error. Estimator (A): its integrand ``ma_value_rate`` is
``d/dt KL(q_t || p_t)`` (central differences of the closed-form KL), and with a non-isotropic linear
student ``A x + b`` (``N(m, V) -> N(M m + A^{-1} (M - I) b, M V M^T)``, ``M = expm(A T)``) one
Hutchinson probe is not exact per sample but unbiased within Monte-Carlo error.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from marflow_core import (
    GaussianMixtureTeacher,
    MAConfig,
    TimeMLP,
    delta_field,
    divergence_fn,
    ma_surrogate,
    ma_value_estimate,
    ma_value_rate,
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
@pytest.mark.parametrize("divergence", ["exact", "hutchinson", "hutchinson_fd"])
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


def per_sample_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """``(B, D, D)`` Jacobians of a map acting on each sample separately: d sum_b fn(x)_b / d x."""
    return torch.autograd.functional.jacobian(lambda z: fn(z).sum(0), x).permute(1, 0, 2)


def euler_map_reference(field, x, t0: float, t1: float, steps: int):
    """End points and log|det| of the whole ``steps``-step Euler map, by autograd of a plain loop."""
    h = (t1 - t0) / steps

    def euler(z):
        for i in range(steps):
            z = z + h * field(z, torch.full((z.shape[0],), t0 + i * h, dtype=z.dtype))
        return z

    with torch.no_grad():
        y = euler(x)
    return y, torch.linalg.slogdet(per_sample_jacobian(euler, x)).logabsdet


def rk4_logdet_reference(field, x, t0: float, t1: float, steps: int):
    """RK4 of the augmented state (x, L), dL/ds = tr(dv/dx) from per-sample autograd Jacobians."""

    def rhs(z, s):
        t = torch.full((z.shape[0],), s, dtype=z.dtype)
        with torch.no_grad():
            v = field(z, t)
        jac = per_sample_jacobian(lambda w: field(w, t), z)
        return v, jac.diagonal(dim1=1, dim2=2).sum(-1)

    h = (t1 - t0) / steps
    logdet = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(steps):
        s = t0 + i * h
        k1, l1 = rhs(x, s)
        k2, l2 = rhs(x + 0.5 * h * k1, s + 0.5 * h)
        k3, l3 = rhs(x + 0.5 * h * k2, s + 0.5 * h)
        k4, l4 = rhs(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        logdet = logdet + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    return x, logdet


@pytest.mark.parametrize("mode", ["continuous", "discrete"])
def test_surrogate_gradient_nonlinear_student_matches_finite_differences(gmm2d, mode):
    """A nonlinear student (its divergence depends on x, so d div / dx . dx / d theta matters).

    On a fixed batch the surrogate's gradient is the gradient of the batch estimate
    ``mean[-logdet(x) - log p^T_{t_end}(Phi(x))]`` (the KL up to a theta-free term). That estimate is
    rebuilt here independently of ``marflow_core``'s log-det code: for "discrete" the log|det| of the
    whole Euler map from autograd Jacobians of a plain Euler loop; for "continuous" a plain RK4 of
    ``(x, L)`` with ``dL/ds`` the trace of autograd Jacobians; ``log p`` is the exact teacher's. It is
    differentiated by central differences along a random parameter direction.
    """
    torch.manual_seed(0)
    student = TimeMLP(2, 16, 2, time_dim=8).double()
    x = gmm2d.sample(64, 0.25, torch.Generator().manual_seed(1))
    wb = window_batch(x, 0.25, 0.5)
    if mode == "continuous":
        cfg = MAConfig(substeps=4, solver="rk4", normalize_by_dim=False)
        reference = rk4_logdet_reference
    else:
        cfg = MAConfig(substeps=3, solver="euler", logdet="discrete", normalize_by_dim=False)
        reference = euler_map_reference
    ma_surrogate(student, gmm2d, wb, cfg).backward()
    params = list(student.parameters())
    gen = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))

    def estimate() -> float:
        y, logdet = reference(student, x, 0.25, 0.5, cfg.substeps)
        return float((-logdet - gmm2d.log_prob(y, 0.5)).mean())

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


class LinearStudent(nn.Module):
    """``v(x, t) = A x + b`` with a general (non-isotropic) matrix ``A``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, x, t):
        return x @ self.a.T + self.b


def general_gaussian_kl(mean_q, cov_q, mean_p, cov_p) -> float:
    """KL(N(mean_q, cov_q) || N(mean_p, cov_p)) for full covariances."""
    dim = len(mean_q)
    diff = mean_p - mean_q
    trace = torch.linalg.solve(cov_p, cov_q).diagonal().sum()
    maha = diff @ torch.linalg.solve(cov_p, diff)
    logdets = torch.linalg.slogdet(cov_p).logabsdet - torch.linalg.slogdet(cov_q).logabsdet
    return float(0.5 * (trace + maha - dim + logdets))


def linear_pushforward(a, b, mean, cov, length):
    """x' = A x + b over ``length`` pushes N(mean, cov) to N(M mean + A^-1 (M - I) b, M cov M^T)."""
    m = torch.linalg.matrix_exp(a * length)
    eye = torch.eye(len(mean), dtype=F64)
    return m @ mean + torch.linalg.solve(a, (m - eye) @ b), m @ cov @ m.T


def one_component(mu: torch.Tensor, sigma: float):
    """The exact teacher of N(mu, sigma^2 I) and its marginal variance t^2 sigma^2 + (1 - t)^2."""
    teacher = GaussianMixtureTeacher([1.0], [mu.tolist()], [sigma], dtype=F64)
    return teacher, (lambda t: t**2 * sigma**2 + (1 - t) ** 2)


@pytest.mark.parametrize("t", [0.3, 0.7])
@pytest.mark.parametrize("kind", ["exact", "hutchinson"])
def test_value_rate_is_the_time_derivative_of_the_kl(t, kind):
    """x ~ q_t = N(m, v I) evolving under v = a x + b (dm/dt = a m + b, dv/dt = 2 a v); p_t the exact
    teacher's marginal. E_q[rate] = d/dt KL(q_t || p_t): central differences of the closed-form KL
    (q at t +- h from the ODE solution, p at t +- h). Whitened samples: the mean is exact."""
    mu, sigma, dim = torch.tensor([1.5, -0.5, 0.8], dtype=F64), 0.5, 3
    teacher, var = one_component(mu, sigma)
    a, b = 0.4, 0.7
    m, v = torch.tensor([0.2, 0.9, -1.0], dtype=F64), 0.6
    n = 512
    z = whitened(n, dim, seed=31)
    x = m + math.sqrt(v) * z
    student = AffineStudent(a, b)
    div = divergence_fn(delta_field(student, teacher), kind, like=x,
                        generator=torch.Generator().manual_seed(32))
    v_student, rate = ma_value_rate(student, teacher, x, torch.full((n,), t, dtype=F64), div)
    assert rate.shape == (n,)
    torch.testing.assert_close(v_student, a * x + b, rtol=1e-12, atol=1e-12)

    def kl(s):
        mean_s, v_s = affine_pushforward(a, b, m, v, s - t)
        return gaussian_kl(mean_s, v_s, s * mu, var(s), dim)

    h = 1e-4
    expected = (kl(t + h) - kl(t - h)) / (2 * h)
    assert abs(expected) > 0.5  # q != p_t: a clearly non-zero rate
    assert float(rate.mean()) == pytest.approx(expected, rel=1e-6)


def test_value_rate_hutchinson_non_isotropic_linear_student():
    """v = A x + b with a general 3x3 A and q_t = N(m, V): dm/dt = A m + b, dV/dt = A V + V A^T.
    The exact divergence gives d/dt KL exactly (whitened samples); one Rademacher probe per sample is
    not exact (its error e^T A e - tr A is off-diagonal) but the batch mean is within 5 SE."""
    mu, sigma, dim, t = torch.tensor([1.0, -1.5, 0.5], dtype=F64), 0.7, 3, 0.4
    teacher, var = one_component(mu, sigma)
    a = torch.tensor([[0.3, 0.8, -0.4], [-0.6, -0.2, 0.5], [0.7, 0.3, 0.1]], dtype=F64)
    b = torch.tensor([0.4, -0.3, 0.6], dtype=F64)
    m = torch.tensor([-0.5, 0.8, 0.2], dtype=F64)
    chol = torch.tensor([[0.9, 0.0, 0.0], [0.3, 0.7, 0.0], [-0.2, 0.4, 1.1]], dtype=F64)
    cov = chol @ chol.T
    n = 20_000
    x = m + whitened(n, dim, seed=33) @ chol.T
    tt = torch.full((n,), t, dtype=F64)
    student = LinearStudent(a, b)
    delta = delta_field(student, teacher)
    _, exact = ma_value_rate(student, teacher, x, tt, divergence_fn(delta, "exact"))
    _, hutch = ma_value_rate(student, teacher, x, tt,
                             divergence_fn(delta, "hutchinson", like=x,
                                           generator=torch.Generator().manual_seed(34)))

    def kl(s):
        mean_s, cov_s = linear_pushforward(a, b, m, cov, s - t)
        return general_gaussian_kl(mean_s, cov_s, s * mu, var(s) * torch.eye(dim, dtype=F64))

    h = 1e-4
    expected = (kl(t + h) - kl(t - h)) / (2 * h)
    assert abs(expected) > 0.5
    assert float(exact.mean()) == pytest.approx(expected, rel=1e-6)
    se = float(hutch.std()) / math.sqrt(n)
    assert abs(float(hutch.mean()) - expected) < 5 * se, (float(hutch.mean()), expected, se)
    # per sample the probe error is -(e^T A e - tr A) for some sign vector e, never 0 here
    err = hutch - exact
    support = torch.tensor([-(float(torch.tensor(e, dtype=F64) @ a @ torch.tensor(e, dtype=F64))
                              - float(a.trace())) for e in itertools.product([-1.0, 1.0], repeat=dim)],
                           dtype=F64)
    assert float((err[:, None] - support[None, :]).abs().min(1).values.max()) < 1e-9
    assert float(err.abs().min()) > 0.1
    assert len(torch.unique(err.round(decimals=6))) > 1
    assert abs(float(err.mean())) < 5 * float(err.std()) / math.sqrt(n)


def test_value_estimate_hutchinson_non_isotropic_linear_student():
    """Estimator (A), integrated: x ~ p_{t_s} pushed by x' = A x + b to N(M c + A^-1 (M - I) b,
    M V M^T), M = expm(A T); its KL to p_{t_e} in closed form. Exact divergence: to ODE accuracy;
    one fixed Hutchinson probe per sample: within 5 standard errors."""
    mu, sigma, dim = torch.tensor([1.2, -0.4, 0.9], dtype=F64), 0.6, 3
    teacher, var = one_component(mu, sigma)
    a = torch.tensor([[-0.2, 0.9, 0.1], [-0.7, 0.3, 0.4], [0.5, -0.3, 0.2]], dtype=F64)
    b = torch.tensor([0.5, 0.2, -0.4], dtype=F64)
    t_start, t_end, n = 0.25, 0.75, 4000
    x = t_start * mu + math.sqrt(var(t_start)) * whitened(n, dim, seed=35)
    student = LinearStudent(a, b)
    mean, cov = linear_pushforward(a, b, t_start * mu, var(t_start) * torch.eye(dim, dtype=F64),
                                   t_end - t_start)
    expected = general_gaussian_kl(mean, cov, t_end * mu, var(t_end) * torch.eye(dim, dtype=F64))
    assert expected > 0.1
    exact = ma_value_estimate(student, teacher, x, t_start, t_end, substeps=16, solver="rk4")
    assert float(exact.mean()) == pytest.approx(expected, rel=1e-5)
    hutch = ma_value_estimate(student, teacher, x, t_start, t_end, substeps=16, solver="rk4",
                              divergence="hutchinson", generator=torch.Generator().manual_seed(36))
    se = float(hutch.std()) / math.sqrt(n)
    assert abs(float(hutch.mean()) - expected) < 5 * se, (float(hutch.mean()), expected, se)
    # whitened samples leave only the probe noise: it is unbiased at its own (smaller) error
    err = hutch - exact
    assert float(err.abs().min()) > 1e-2  # not exact per sample
    assert abs(float(err.mean())) < 5 * float(err.std()) / math.sqrt(n)


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


def test_batch_fraction_uses_the_first_rows_only():
    """``batch_fraction = 0.5`` on 20 rows whose last 10 are NaN: finite, and equal to the closed-form
    per-sample surrogate of the discrete Euler map averaged over the first 10 rows (over ``d``)."""
    a, b, dim = 0.3, 0.2, 2
    x = torch.cat([whitened(10, dim, seed=4) + 0.5, torch.full((10, dim), float("nan"), dtype=F64)])
    wb = window_batch(x, 0.0, 0.5)
    m, s = torch.tensor([0.2, -0.1], dtype=F64), 1.3
    cfg = MAConfig(substeps=1, logdet="discrete", batch_fraction=0.5)
    value = ma_surrogate(AffineStudent(a, b), GaussianTarget(m, s), wb, cfg)
    g = 1 + a * 0.5  # one Euler step of length 0.5
    y = g * x[:10] + b * 0.5
    per_sample = -dim * math.log(g) - (-(y - m) / s**2 * y).sum(-1)
    assert torch.isfinite(value)
    assert float(value) == pytest.approx(float(per_sample.mean()) / dim, rel=1e-12)
    with pytest.raises(ValueError):
        MAConfig(batch_fraction=0.0)
