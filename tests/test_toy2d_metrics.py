"""The 2-D tier's evaluation metrics against closed forms (replication/toy2d/metrics.py).

An affine student ``v(x, t) = a x + b`` (per coordinate) makes every Euler map affine,
``y = g x + c``, so the student's density is a Gaussian in closed form; with a one-component exact
teacher ``p_t = N(t mu, (t^2 sigma^2 + (1 - t)^2) I)`` the KL is closed form too. Whitened start
samples (empirical mean and covariance exact) make Monte-Carlo means of quadratics exact; everything
else is checked within a few Monte-Carlo standard errors. References are built here from
``torch.distributions``, ``math.erf``, ``scipy.integrate.quad`` and hand-written formulas, never from
the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marflow_core import GaussianMixtureTeacher, TimeWindows
from replication.toy2d.metrics import (
    kl_tv,
    mmd_rbf,
    mode_mass,
    sampler_densities,
    sliced_wasserstein,
    window_densities,
)

F64 = torch.float64


class AffineStudent(nn.Module):
    """``v(x, t) = a * x + b`` with per-coordinate ``a, b: (D,)``."""

    def __init__(self, a, b) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=F64))
        self.b = nn.Parameter(torch.as_tensor(b, dtype=F64))

    def forward(self, x, t):
        return self.a * x + self.b


def whitened(n: int, dim: int, seed: int) -> torch.Tensor:
    """Samples with empirical mean exactly 0 and empirical (1/n) covariance exactly I."""
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def euler_affine(a: torch.Tensor, b: torch.Tensor, steps: list[float]):
    """Euler steps of ``a x + b``: ``x <- (1 + h a) x + h b``; returns ``(g, c)`` with ``y = g x + c``."""
    g, c = torch.ones_like(a), torch.zeros_like(b)
    for h in steps:
        g, c = (1 + h * a) * g, (1 + h * a) * c + h * b
    return g, c


def diag_gaussian_log_prob(y, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(y).sum(-1)


def diag_gaussian_kl(mean_q, std_q, mean_p, std_p) -> float:
    """KL(N(mean_q, diag std_q^2) || N(mean_p, diag std_p^2)), summed over coordinates."""
    vq, vp = std_q**2, std_p**2
    return float((0.5 * (vq / vp + (mean_q - mean_p) ** 2 / vp - 1 + torch.log(vp / vq))).sum())


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def teacher_var(t: float, sigma: float) -> float:
    return t**2 * sigma**2 + (1 - t) ** 2


# --------------------------------------------------------------------------- sampler_densities
@pytest.mark.parametrize(("n_windows", "n_steps", "steps"), [
    (1, 1, [1.0]),
    (2, 4, [0.25, 0.25, 0.25, 0.25]),
    (4, 2, [0.5, 0.5]),  # fewer steps than windows: the non-strict uniform grid
])
def test_sampler_densities_affine_student_closed_form(n_windows, n_steps, steps):
    """y = g x0 + c: log q = log N(y; c, diag g^2), log p = log N(y; mu, sigma^2 I), KL in closed form."""
    a = torch.tensor([0.6, -0.3], dtype=F64)
    b = torch.tensor([0.5, -0.3], dtype=F64)
    mu, sigma = torch.tensor([1.2, -0.7], dtype=F64), 0.8
    teacher = GaussianMixtureTeacher([1.0], [mu.tolist()], [sigma], dtype=F64)
    x0 = whitened(4096, 2, seed=21)
    md = sampler_densities(AffineStudent(a, b), TimeWindows(n_windows), n_steps, x0, teacher)

    g, c = euler_affine(a, b, steps)
    assert float(torch.log(g.abs()).sum().abs()) > 0.1  # a real volume change
    y = g * x0 + c
    torch.testing.assert_close(md.y, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(md.log_q, diag_gaussian_log_prob(y, c, g.abs()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(md.log_p, diag_gaussian_log_prob(y, mu, torch.full_like(mu, sigma)),
                               rtol=1e-10, atol=1e-10)
    assert md.n_folded == 0
    kl = kl_tv(md.log_q, md.log_p)["kl"]
    expected = diag_gaussian_kl(c, g.abs(), mu, torch.full_like(mu, sigma))
    assert expected > 0.1
    assert kl.value == pytest.approx(expected, rel=1e-9)


def test_sampler_densities_tv_of_equal_variance_gaussians():
    """a = 0: q = N(b, I); teacher N(mu, I): TV = 2 Phi(|b - mu| / 2) - 1 (within 5 standard errors)."""
    b = torch.tensor([0.8, -0.6], dtype=F64)
    mu = torch.tensor([0.2, 0.2], dtype=F64)
    teacher = GaussianMixtureTeacher([1.0], [mu.tolist()], [1.0], dtype=F64)
    x0 = torch.randn(100_000, 2, generator=torch.Generator().manual_seed(22), dtype=F64)
    md = sampler_densities(AffineStudent(torch.zeros(2), b), TimeWindows(2), 2, x0, teacher)
    torch.testing.assert_close(md.y, x0 + b, rtol=1e-12, atol=1e-12)
    out = kl_tv(md.log_q, md.log_p)
    delta = float((b - mu).norm())
    tv = 2 * normal_cdf(delta / 2) - 1
    assert tv > 0.3
    assert abs(out["tv"].value - tv) < 5 * out["tv"].stderr, (out["tv"], tv)
    assert out["tv"].stderr < 0.01 * tv
    kl = 0.5 * delta**2
    assert abs(out["kl"].value - kl) < 5 * out["kl"].stderr, (out["kl"], kl)


# --------------------------------------------------------------------------- kl_tv
def test_kl_tv_one_dimensional_gaussians_of_different_variances():
    """q = N(0.3, 0.8^2), p = N(-0.4, 1.5^2): TV = int |p - q| / 2 by quadrature, KL closed form."""
    integrate = pytest.importorskip("scipy.integrate")
    mq, sq, mp, sp = 0.3, 0.8, -0.4, 1.5
    x = mq + sq * torch.randn(100_000, generator=torch.Generator().manual_seed(23), dtype=F64)
    q = torch.distributions.Normal(torch.tensor(mq, dtype=F64), torch.tensor(sq, dtype=F64))
    p = torch.distributions.Normal(torch.tensor(mp, dtype=F64), torch.tensor(sp, dtype=F64))
    out = kl_tv(q.log_prob(x), p.log_prob(x))

    def density(m, s, z):
        return math.exp(-0.5 * ((z - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    tv, _ = integrate.quad(lambda z: 0.5 * abs(density(mq, sq, z) - density(mp, sp, z)), -30, 30,
                           limit=200, points=[-2.0, 0.0, 2.0])
    kl = math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5
    assert tv > 0.2
    assert abs(out["tv"].value - tv) < 5 * out["tv"].stderr, (out["tv"], tv)
    assert abs(out["kl"].value - kl) < 5 * out["kl"].stderr, (out["kl"], kl)
    # the standard errors are std / sqrt(n) of the per-sample terms
    assert out["kl"].stderr == pytest.approx(float((q.log_prob(x) - p.log_prob(x)).std()) / math.sqrt(len(x)))


def test_kl_tv_identical_densities_are_zero():
    log = torch.distributions.Normal(0.0, 1.0).log_prob(torch.linspace(-3, 3, 101, dtype=F64))
    out = kl_tv(log, log.clone())
    assert out["kl"].value == 0.0 and out["tv"].value == 0.0


# --------------------------------------------------------------------------- window_densities
def test_window_densities_affine_student_on_a_late_window():
    """Window [0.25, 0.5]: x ~ p_0.25 is pushed by 3 Euler steps, y = g x + c; log q is the Gaussian
    N(g 0.25 mu + c, g^2 var(0.25)) at y (per sample) and the KL to p_0.5 is closed form (MC)."""
    mu, sigma = torch.tensor([1.5, -0.5], dtype=F64), 0.6
    teacher = GaussianMixtureTeacher([1.0], [mu.tolist()], [sigma], dtype=F64)
    a = torch.tensor([0.7, -0.4], dtype=F64)
    b = torch.tensor([0.3, 0.5], dtype=F64)
    t_start, t_end, steps, n = 0.25, 0.5, 3, 50_000
    md = window_densities(AffineStudent(a, b), teacher, t_start, t_end, steps, n,
                          torch.Generator().manual_seed(24))
    assert md.y.shape == (n, 2) and md.n_folded == 0
    g, c = euler_affine(a, b, [(t_end - t_start) / steps] * steps)
    mean_q = g * t_start * mu + c
    std_q = g.abs() * math.sqrt(teacher_var(t_start, sigma))
    std_p = torch.full_like(mu, math.sqrt(teacher_var(t_end, sigma)))
    torch.testing.assert_close(md.log_q, diag_gaussian_log_prob(md.y, mean_q, std_q), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(md.log_p, diag_gaussian_log_prob(md.y, t_end * mu, std_p),
                               rtol=1e-10, atol=1e-10)
    ratio = md.log_q - md.log_p
    est, se = float(ratio.mean()), float(ratio.std()) / math.sqrt(n)
    expected = diag_gaussian_kl(mean_q, std_q, t_end * mu, std_p)
    assert expected > 0.05
    assert abs(est - expected) < 5 * se, (est, expected, se)


# --------------------------------------------------------------------------- sliced_wasserstein
@pytest.mark.parametrize("shift", [[1.0, -2.0], [1.0, -1.0, 0.5, 2.0, -0.5]])
def test_sliced_wasserstein_of_a_shift(shift):
    """b = a + c: every projection is shifted by c.u, so SW^2 = mean_u (c.u)^2 -> |c|^2 / D.

    For u uniform on the sphere, (c.u)^2 = |c|^2 u_1^2 with E u_1^2 = 1/D and
    Var u_1^2 = 2 (D - 1) / (D^2 (D + 2)): with P projections SW^2 is within 5 standard errors.
    """
    c = torch.tensor(shift, dtype=F64)
    dim, n, n_proj = len(shift), 256, 20_000
    a = torch.randn(n, dim, generator=torch.Generator().manual_seed(25), dtype=F64)
    sw = sliced_wasserstein(a, a + c, n_proj, torch.Generator().manual_seed(26))
    c2 = float(c.pow(2).sum())
    se = c2 * math.sqrt(2 * (dim - 1) / (dim**2 * (dim + 2) * n_proj))
    assert abs(sw**2 - c2 / dim) < 5 * se, (sw**2, c2 / dim, se)
    assert 5 * se < 0.05 * c2 / dim  # the tolerance is meaningful
    # the same law (a permutation of the same points) is at distance 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(27))
    assert sliced_wasserstein(a, a[perm], 16, torch.Generator().manual_seed(28)) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_needs_equal_shapes():
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(5, 2), 8, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- mmd_rbf
def gaussian_kernel_mean(h: float, mu1, cov1, mu2, cov2) -> float:
    """E exp(-|x - y|^2 / (2 h^2)) for independent x ~ N(mu1, cov1), y ~ N(mu2, cov2)."""
    dim = len(mu1)
    m = h**2 * torch.eye(dim, dtype=F64) + cov1 + cov2
    d = mu1 - mu2
    quad = float(d @ torch.linalg.solve(m, d))
    return h**dim * float(torch.linalg.det(m)) ** -0.5 * math.exp(-0.5 * quad)


def test_mmd_is_unbiased_for_two_samples_of_one_law():
    """200 pairs of n = 40 samples of N(0, I): the mean estimate is within 3 standard errors of 0
    (the biased V-statistic is off by about (sum_h 1 - E k) / n per term, many standard errors)."""
    gen = torch.Generator().manual_seed(29)
    values = torch.tensor([mmd_rbf(torch.randn(40, 2, generator=gen, dtype=F64),
                                   torch.randn(40, 2, generator=gen, dtype=F64)) for _ in range(200)])
    est, se = float(values.mean()), float(values.std()) / math.sqrt(len(values))
    assert abs(est) < 3 * se, (est, se)
    assert se < 0.01  # the test could see a bias of 0.05
    assert float(values.min()) < 0  # an unbiased estimate of 0 takes negative values


def test_mmd_between_shifted_gaussians_matches_closed_form():
    """MMD^2(N(0, s^2 I), N(m, s^2 I)) = sum_h [E k(x, x') + E k(y, y') - 2 E k(x, y)]."""
    s, dim = 0.7, 2
    m = torch.tensor([0.6, -0.3], dtype=F64)
    bandwidths = (0.3, 1.0, 3.0)
    cov, zero = s**2 * torch.eye(dim, dtype=F64), torch.zeros(dim, dtype=F64)
    expected = sum(gaussian_kernel_mean(h, zero, cov, zero, cov) + gaussian_kernel_mean(h, m, cov, m, cov)
                   - 2 * gaussian_kernel_mean(h, zero, cov, m, cov) for h in bandwidths)
    gen = torch.Generator().manual_seed(30)
    values = torch.tensor([mmd_rbf(s * torch.randn(200, dim, generator=gen, dtype=F64),
                                   m + s * torch.randn(200, dim, generator=gen, dtype=F64), bandwidths)
                           for _ in range(30)])
    est, se = float(values.mean()), float(values.std()) / math.sqrt(len(values))
    assert expected > 10 * se
    assert abs(est - expected) < 5 * se, (est, expected, se)


def test_kernel_mean_formula_against_monte_carlo():
    """The closed form used above, checked once against brute force (anisotropic covariances)."""
    gen = torch.Generator().manual_seed(31)
    mu1, mu2 = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([-0.5, 0.4], dtype=F64)
    l1 = torch.tensor([[0.8, 0.0], [0.3, 0.5]], dtype=F64)
    l2 = torch.tensor([[0.4, 0.0], [-0.2, 0.9]], dtype=F64)
    x = mu1 + torch.randn(200_000, 2, generator=gen, dtype=F64) @ l1.T
    y = mu2 + torch.randn(200_000, 2, generator=gen, dtype=F64) @ l2.T
    k = torch.exp(-(x - y).pow(2).sum(-1) / (2 * 0.7**2))
    exact = gaussian_kernel_mean(0.7, mu1, l1 @ l1.T, mu2, l2 @ l2.T)
    assert abs(float(k.mean()) - exact) < 5 * float(k.std()) / math.sqrt(len(k))


# --------------------------------------------------------------------------- mode_mass
@pytest.fixture
def separated() -> GaussianMixtureTeacher:
    """Three modes 20 apart with stds <= 1: the nearest mode is the true component."""
    return GaussianMixtureTeacher([0.5, 0.3, 0.2], [[20.0, 0.0], [-20.0, 0.0], [0.0, 20.0]],
                                  [0.5, 1.0, 0.7], dtype=F64)


def test_mode_mass_of_exact_teacher_samples(separated):
    n = 40_000
    x, labels = separated.sample(n, 1.0, torch.Generator().manual_seed(32), return_components=True)
    out = mode_mass(x, separated)
    mass = torch.tensor(out["mass"], dtype=F64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    se = torch.sqrt(w * (1 - w) / n)
    assert torch.all((mass - w).abs() < 5 * se), (mass, w, se)
    torch.testing.assert_close(mass, torch.bincount(labels, minlength=3).to(F64) / n, rtol=0, atol=1e-15)
    assert out["mass_error"] == pytest.approx(0.5 * float((mass - w).abs().sum()), abs=1e-15)
    # off-mode: in 2-D, P(|z| > 3) = exp(-9/2) for a standard normal z
    off = math.exp(-4.5)
    assert abs(out["off_mode"] - off) < 5 * math.sqrt(off * (1 - off) / n), out["off_mode"]
    assert out["off_mode_se"] == pytest.approx(math.sqrt(out["off_mode"] * (1 - out["off_mode"]) / n))


def test_mode_mass_counts_points_far_from_every_mode(separated):
    """Points at r sigma_i from mode i: r <= 2.9 is on-mode, r >= 3.1 off; two points far from all."""
    means, stds = separated.means, separated.stds
    angle = torch.tensor([0.6, 0.8], dtype=F64)
    on = [means[i] + r * stds[i] * angle for i in range(3) for r in (0.0, 1.5, 2.9)]
    off = [means[i] + r * stds[i] * angle for i in range(3) for r in (3.1, 6.0)]
    far = [torch.tensor([100.0, 100.0], dtype=F64), torch.tensor([0.0, 0.0], dtype=F64)]
    out = mode_mass(torch.stack(on + off + far), separated)
    assert out["off_mode"] == pytest.approx(8 / 17, abs=1e-15)
    out_on = mode_mass(torch.stack(on), separated)
    assert out_on["off_mode"] == 0.0
    assert out_on["mass"] == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=1e-15)
