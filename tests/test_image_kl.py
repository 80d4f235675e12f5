"""KL(student || teacher) of the image tier (replication/images/kl.py) against closed forms.

Closed forms used:

- Linear student ``v(x, t) = (A + t A2) x + (b + t b2)``: each Euler step is the affine map
  ``x <- M_n x + c_n`` with ``M_n = I + h_n (A + t_n A2)``, ``c_n = h_n (b + t_n b2)``; from
  ``x0 ~ N(0, I)`` the student marginal is ``N(m, S)`` with ``m <- M_n m + c_n``, ``S <- M_n S M_n^T``.
- Gaussian teacher: data ``x1 ~ N(mu, Sigma)``, ``x_t = (1 - t) x0 + t x1``. Then ``x_t ~ N(t mu, C_t)``,
  ``C_t = (1 - t)^2 I + t^2 Sigma``, ``Cov(x1 - x0, x_t) = t Sigma - (1 - t) I``, so the exact
  velocity ``E[x1 - x0 | x_t = x] = mu + (t Sigma - (1 - t) I) C_t^{-1} (x - t mu)`` (affine in ``x``;
  with ``Sigma = U diag(s) U^T`` the matrix is ``U diag((t s - (1 - t)) / ((1 - t)^2 + t^2 s)) U^T``),
  and its ODE pushes ``N(0, I)`` to ``p_1 = N(mu, Sigma)``.
- ``KL(N(m, S) || N(mu, Sigma)) = 1/2 [tr(Sigma^-1 S) + (mu - m)^T Sigma^-1 (mu - m) - D
  + log det Sigma - log det S]``.
"""

from __future__ import annotations

import math

import pytest
import torch

from marflow_core import TimeWindows, derive_seed, sample_few_step, stream
from replication.images.kl import (
    FlatField,
    KLEstimate,
    kl_student_teacher,
    student_logq,
    teacher_logp,
)

F64 = torch.float64


class LinearStudent(torch.nn.Module):
    """``v(x, t) = (A + t A2) x + (b + t b2)`` on ``x: (B, D)``."""

    def __init__(self, a, b, a2=None, b2=None) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.a2 = torch.zeros_like(a) if a2 is None else a2
        self.b2 = torch.zeros_like(b) if b2 is None else b2

    def matrix(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a + t * self.a2, self.b + t * self.b2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])[:, None]
        return x @ self.a.T.to(x.dtype) + self.b.to(x.dtype) + t * (x @ self.a2.T.to(x.dtype) + self.b2.to(x.dtype))

    def marginal(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ``(m, S)`` after the Euler steps of ``grid`` from ``N(0, I)``."""
        d = self.a.shape[0]
        m, s = torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)
        for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            h = t1 - t0
            a, b = self.matrix(t0)
            mat = torch.eye(d, dtype=F64) + h * a
            m, s = mat @ m + h * b, mat @ s @ mat.T
        return m, s


class GaussianTeacher(torch.nn.Module):
    """Exact rectified-flow velocity of data ``N(mu, Sigma)`` (module docstring)."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.s, self.u = torch.linalg.eigh(sigma)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])[:, None]
        coef = (t * self.s - (1 - t)) / ((1 - t) ** 2 + t**2 * self.s)  # (B, D)
        return self.mu + (((x - t * self.mu) @ self.u) * coef) @ self.u.T


def gaussian_logpdf(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(m, covariance_matrix=s).log_prob(x)


def gaussian_kl(m, s, mu, sigma) -> float:
    d = m.shape[0]
    inv = torch.linalg.inv(sigma)
    diff = mu - m
    return float(0.5 * (torch.trace(inv @ s) + diff @ inv @ diff - d
                        + torch.logdet(sigma) - torch.logdet(s)))


def make_student(d: int, seed: int = 1) -> LinearStudent:
    g = stream(seed, "test-student")
    a = 0.3 * torch.randn(d, d, generator=g, dtype=F64) - 0.2 * torch.eye(d, dtype=F64)
    a2 = 0.2 * torch.randn(d, d, generator=g, dtype=F64)
    return LinearStudent(a, torch.randn(d, generator=g, dtype=F64), a2, 0.5 * torch.randn(d, generator=g, dtype=F64))


def make_teacher(d: int, seed: int = 2) -> GaussianTeacher:
    g = stream(seed, "test-teacher")
    root = torch.randn(d, d, generator=g, dtype=F64)
    sigma = 1.2 * root @ root.T / d + 0.1 * torch.eye(d, dtype=F64)  # correlated: Hutchinson has variance
    return GaussianTeacher(torch.randn(d, generator=g, dtype=F64), sigma)


def student_near(teacher: GaussianTeacher, seed: int, pert: float = 0.05) -> LinearStudent:
    """``A = log Sigma^{1/2}`` (``exp(A)`` maps ``N(0, I)`` to covariance ``Sigma``), ``b = mu``, plus
    ``pert``-sized random terms (and ``t``-dependent ones): close to the teacher, KL of order 0.3."""
    d = teacher.mu.shape[0]
    g = stream(seed, "test-student-near")
    a = teacher.u @ torch.diag(0.5 * teacher.s.log()) @ teacher.u.T
    return LinearStudent(a + pert * torch.randn(d, d, generator=g, dtype=F64),
                         teacher.mu + pert * torch.randn(d, generator=g, dtype=F64),
                         pert * torch.randn(d, d, generator=g, dtype=F64), pert * torch.randn(d, generator=g, dtype=F64))


def noise(n: int, d: int, name: str, dtype=F64) -> torch.Tensor:
    return torch.randn(n, d, generator=stream(0, name), dtype=dtype)


# ---------------------------------------------------------------- student log q


@pytest.mark.parametrize("d, n_windows, nfe", [(3, 1, 1), (5, 2, 3), (8, 4, 6)])
def test_student_logq_is_the_gaussian_pushforward(d, n_windows, nfe):
    student, windows = make_student(d), TimeWindows(n_windows)
    grid = windows.step_grid(nfe, strict=False)
    x0 = noise(64, d, "logq")
    x, log_q, n_folds = student_logq(student, x0, grid, chunk=24)
    m, s = student.marginal(grid)
    torch.testing.assert_close(x, sample_few_step(student, x0, windows, nfe), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_q, gaussian_logpdf(x, m, s), rtol=0, atol=1e-10)
    assert n_folds == 0


def test_student_logq_float32_net_accumulates_in_float64():
    student, windows = make_student(6), TimeWindows(2)
    grid = windows.step_grid(4)
    x0 = noise(32, 6, "logq32", torch.float32)
    out = student_logq(student, x0, grid)
    m, s = student.marginal(grid)
    assert out.x.dtype == torch.float32 and out.log_q.dtype == F64
    torch.testing.assert_close(out.log_q, gaussian_logpdf(out.x.to(F64), m, s), rtol=0, atol=2e-4)


def test_folds_of_a_reflecting_linear_step_are_counted_and_exact():
    """``h A = -2 I`` in ``D = 3``: ``det(I + h A) = (-1)^3 < 0`` on every step, yet the map is
    invertible, so ``log q`` stays the exact Gaussian log-density."""
    d = 3
    student = LinearStudent(-4.0 * torch.eye(d, dtype=F64), torch.full((d,), 0.5, dtype=F64))
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=F64)  # h = 0.5: h A = -2 I
    x0 = noise(40, d, "fold-linear")
    x, log_q, n_folds = student_logq(student, x0, grid, chunk=16)
    m, s = student.marginal(grid)
    assert n_folds == 40
    torch.testing.assert_close(log_q, gaussian_logpdf(x, m, s), rtol=0, atol=1e-10)


def test_folds_are_counted_per_sample():
    """``v_0 = -1.5 x_0^2`` (other coordinates 0), one step ``h = 1``: ``det = 1 - 3 x_0``, a fold
    exactly where ``x_0 >= 1/3``; ``log q = log N(x0) - log|1 - 3 x_0|``."""

    def field(x, t):
        return torch.cat([-1.5 * x[:, :1] ** 2, torch.zeros_like(x[:, 1:])], dim=1)

    x0 = noise(101, 4, "fold-quadratic")
    x, log_q, n_folds = student_logq(field, x0, torch.tensor([0.0, 1.0], dtype=F64), chunk=10)
    assert n_folds == int((x0[:, 0] >= 1 / 3).sum()) and 0 < n_folds < 101
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x0).sum(1) - torch.log((1 - 3 * x0[:, 0]).abs())
    torch.testing.assert_close(log_q, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(x[:, 0], x0[:, 0] - 1.5 * x0[:, 0] ** 2, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- teacher log p


@pytest.mark.parametrize("d", [3, 7])
def test_teacher_logp_exact_trace_is_the_data_density(d):
    teacher = make_teacher(d)
    x = torch.cat([teacher.mu + noise(30, d, "tp") @ torch.linalg.cholesky(teacher.sigma).T,
                   3.0 * noise(10, d, "tp-far")])
    logp, se = teacher_logp(teacher, x, n_steps=64, method="rk4", divergence="exact", chunk=16)
    torch.testing.assert_close(logp, gaussian_logpdf(x, teacher.mu, teacher.sigma), rtol=0, atol=1e-5)
    assert torch.equal(se, torch.zeros_like(se))


class TanhTeacher(torch.nn.Module):
    """A nonlinear field ``v(x, t) = (1 + t) W tanh(x) + c``: its divergence
    ``(1 + t) sum_i W_ii (1 - tanh^2 x_i)`` depends on ``x``, and Rademacher probes have variance
    (``W`` has off-diagonal entries)."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        g = stream(seed, "test-tanh-teacher")
        self.w, self.c = torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])[:, None]
        return (1 + t) * torch.tanh(x) @ self.w.T + self.c


def test_hutchinson_teacher_logp_is_unbiased_with_calibrated_se():
    """3 points tiled 600 times (independent probes per row; neighbouring rows differ): the mean of
    the Hutchinson estimates per point matches the exact trace (same discretisation) within 4 SE,
    and the reported per-sample ``se^2`` matches the spread of the estimates."""
    d, reps = 5, 600
    teacher = TanhTeacher(d, 6)
    points = 1.5 * noise(3, d, "hutch-points")
    exact, _ = teacher_logp(teacher, points, 8, "rk4", divergence="exact")
    assert (exact[1:] - exact[0]).abs().min() > 0.5  # the points have different densities
    logp, se = teacher_logp(teacher, points.repeat(reps, 1), 8, "rk4", probes=1,
                            generator=stream(0, "hutch"), groups=2, chunk=512)
    logp, se = logp.view(reps, 3).T, se.view(reps, 3).T
    spread = logp.std(1)
    assert bool((spread > 0.05).all())  # the test has power: the estimator is noisy
    assert (logp.mean(1) - exact).abs().max() < 4 * (spread / math.sqrt(reps)).max()
    ratio = se.pow(2).mean(1) / spread.pow(2)
    assert bool(((ratio > 0.75) & (ratio < 1.33)).all()), ratio


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize("d, n_windows, nfe", [(4, 1, 2), (6, 2, 3)])
def test_kl_matches_closed_form_gaussian_kl(d, n_windows, nfe):
    teacher, windows = make_teacher(d, 4), TimeWindows(n_windows)
    student = student_near(teacher, 3)
    x0 = noise(3000, d, f"kl-{d}")
    est = kl_student_teacher(student, teacher, x0, windows, nfe, teacher_steps=12, probes=1, groups=2,
                             seed=5, chunk=1000)
    m, s = student.marginal(windows.step_grid(nfe, strict=False))
    truth = gaussian_kl(m, s, teacher.mu, teacher.sigma)
    assert isinstance(est, KLEstimate) and est.n_samples == 3000 and est.fold_fraction == 0.0
    assert truth > 0.2 and abs(est.kl - truth) < 3 * est.stderr, (est, truth)
    exact = kl_student_teacher(student, teacher, x0, windows, nfe, teacher_steps=12,
                               divergence="exact", chunk=1000)
    assert abs(exact.kl - truth) < 3 * exact.stderr and exact.hutchinson_stderr == 0.0
    # error budget: the Hutchinson part is real and the rest is the exact estimator's sampling error
    assert 0.5 * est.stderr < est.hutchinson_stderr < est.stderr
    assert est.sample_stderr == pytest.approx(exact.stderr, rel=0.15)
    assert est.stderr**2 == pytest.approx(est.sample_stderr**2 + est.hutchinson_stderr**2, rel=1e-9)
    assert est.seconds == pytest.approx(est.student_seconds + est.teacher_seconds)
    # the Hutchinson errors (log p_hat - log p; x-independent for this linear teacher) are fresh per chunk
    err = est.log_p - gaussian_logpdf(sample_few_step(student, x0, windows, nfe), teacher.mu, teacher.sigma)
    assert err.std() > 0.1 and (err[:1000] - err[1000:2000]).abs().max() > 0.1


def test_kl_counts_fold_fraction():
    d = 3
    student = LinearStudent(-4.0 * torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64))
    teacher = make_teacher(d)
    est = kl_student_teacher(student, teacher, noise(50, d, "kl-fold"), TimeWindows(2), 2,
                             teacher_steps=4, chunk=20)
    assert est.fold_fraction == 1.0


# ---------------------------------------------------------------- diffusers UNet smoke


def test_unet_kl_smoke():
    from marflow_core.unet import UNetConfig, UNetVelocity

    cfg = UNetConfig(widths=[8, 16], attention_levels=[1], norm_groups=4)
    nets = []
    for name in ("student", "teacher"):
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(0, f"test-unet-{name}"))
            nets.append(FlatField(UNetVelocity(1, 8, cfg), (1, 8, 8)).eval())
    x0 = noise(6, 64, "unet", torch.float32)
    est = kl_student_teacher(nets[0], nets[1], x0, TimeWindows(2), 2, teacher_steps=2, teacher_method="heun",
                             probes=1, groups=2, chunk=3)
    assert est.n_samples == 6 and est.log_q.shape == (6,) and est.log_p.shape == (6,)
    assert all(math.isfinite(v) for v in (est.kl, est.stderr, est.hutchinson_stderr, est.fold_fraction))
    assert est.hutchinson_stderr > 0
