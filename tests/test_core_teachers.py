"""The exact Gaussian-mixture teacher (docs/method.md, section 6) against closed forms and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marflow_core import GaussianMixtureTeacher, VelocityTeacher, score_from_velocity


def _density(teacher, x, t):
    return teacher.log_prob(x, t).exp()


@pytest.mark.parametrize("fixture", ["gmm2d", "gmm3d"])
def test_continuity_equation_by_central_differences(fixture, request):
    """d/dt p_t + div(p_t v) = 0 with every derivative a float64 central difference."""
    teacher = request.getfixturevalue(fixture)
    gen = torch.Generator().manual_seed(0)
    h = 1e-5
    for t in [0.07, 0.3, 0.55, 0.81, 0.96]:
        x = teacher.sample(40, t, gen)
        dpdt = (_density(teacher, x, t + h) - _density(teacher, x, t - h)) / (2 * h)
        div = torch.zeros_like(dpdt)
        for j in range(teacher.dim):
            e = torch.zeros(teacher.dim, dtype=x.dtype)
            e[j] = h
            flux_p = _density(teacher, x + e, t) * teacher.velocity(x + e, t)[:, j]
            flux_m = _density(teacher, x - e, t) * teacher.velocity(x - e, t)[:, j]
            div = div + (flux_p - flux_m) / (2 * h)
        scale = dpdt.abs() + div.abs() + 1e-12
        assert torch.all((dpdt + div).abs() <= 1e-6 * scale), (t, (dpdt + div).abs().max())
        # non-trivial: both terms are of order one relative to each other
        assert dpdt.abs().max() > 1e-3


def test_log_prob_normalised_in_2d(gmm2d):
    """p_t integrates to one on a grid (catches a wrong normalising constant)."""
    g = torch.linspace(-7, 7, 561, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    cell = float(g[1] - g[0]) ** 2
    for t in [0.0, 0.4, 1.0]:
        mass = float(gmm2d.log_prob(pts, t).exp().sum()) * cell
        assert mass == pytest.approx(1.0, abs=1e-6)


def test_score_is_autograd_gradient_of_log_prob(gmm3d):
    gen = torch.Generator().manual_seed(1)
    x = 2.5 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    t[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm3d.log_prob(xg, t).sum(), xg)
    torch.testing.assert_close(gmm3d.score(x, t), grad, rtol=1e-10, atol=1e-12)


def test_score_equals_score_from_velocity(gmm3d):
    """s = (t v - x) / (1 - t) is exact for the linear interpolant (t < t_max)."""
    gen = torch.Generator().manual_seed(2)
    x = 2.0 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    t = 0.98 * torch.rand(64, generator=gen, dtype=torch.float64)
    expected = gmm3d.score(x, t)
    torch.testing.assert_close(score_from_velocity(gmm3d, x, t, 0.99), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(VelocityTeacher(gmm3d, 0.99).score(x, t), expected, rtol=1e-9, atol=1e-10)
    # the cutoff: at t = 1 the score is evaluated at t_max
    s_cut = score_from_velocity(gmm3d, x, 1.0, 0.9)
    torch.testing.assert_close(s_cut, gmm3d.score(x, 0.9), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError):
        score_from_velocity(gmm3d, x, t, 1.0)


def test_velocity_endpoints(gmm3d):
    """t = 0: x0 = x exactly, so v = E[x1] - x. t = 1: x1 = x, x0 independent, so v = x."""
    gen = torch.Generator().manual_seed(3)
    x = 3.0 * torch.randn(32, 3, generator=gen, dtype=torch.float64)
    mean1 = sum(w * torch.tensor(m, dtype=torch.float64) for w, m in zip(
        [0.5, 0.3, 0.2], [[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0]], strict=True))
    torch.testing.assert_close(gmm3d.velocity(x, 0.0), mean1 - x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm3d.velocity(x, 1.0), x, rtol=1e-12, atol=1e-12)


def test_velocity_by_quadrature_1d():
    """E[x1 - x0 | x_t = x] by direct numerical integration over x1 (an independent route), D = 1."""
    w, mu, sd = np.array([0.2, 0.5, 0.3]), np.array([-2.0, 0.5, 3.0]), np.array([0.4, 0.8, 0.25])
    teacher = GaussianMixtureTeacher(w, mu[:, None], sd, dtype=torch.float64)
    x1 = np.linspace(-12, 12, 400001)
    dx = x1[1] - x1[0]
    p1 = sum(wi * np.exp(-0.5 * ((x1 - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
             for wi, m, s in zip(w, mu, sd, strict=True))
    for t in [0.1, 0.45, 0.8]:
        for x in [-2.5, -0.3, 1.0, 2.7]:
            # x_t | x1 ~ N(t x1, (1 - t)^2), x0 = (x - t x1) / (1 - t)
            lik = np.exp(-0.5 * ((x - t * x1) / (1 - t)) ** 2) / ((1 - t) * math.sqrt(2 * math.pi))
            joint = p1 * lik
            z = joint.sum() * dx
            v = ((x1 - (x - t * x1) / (1 - t)) * joint).sum() * dx / z
            xt = torch.tensor([[x]], dtype=torch.float64)
            assert float(teacher.velocity(xt, t)[0, 0]) == pytest.approx(v, rel=1e-6, abs=1e-8)
            assert float(teacher.log_prob(xt, t)[0]) == pytest.approx(math.log(z), rel=1e-7)


def test_samples_match_closed_form_moments(gmm3d):
    """Mean sum_i pi_i t mu_i and covariance sum_i pi_i (var_i I + t^2 mu_i mu_i^T) - m m^T."""
    n, t = 200_000, 0.6
    gen = torch.Generator().manual_seed(4)
    x, idx = gmm3d.sample(n, t, gen, return_components=True)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mu = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0]], dtype=torch.float64)
    sd = torch.tensor([0.3, 0.6, 1.0], dtype=torch.float64)
    var = t**2 * sd**2 + (1 - t) ** 2
    mean = (w[:, None] * t * mu).sum(0)
    cov = sum(w[i] * (var[i] * torch.eye(3, dtype=torch.float64) + t**2 * torch.outer(mu[i], mu[i]))
              for i in range(3)) - torch.outer(mean, mean)
    se_mean = (cov.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() < 5 * se_mean)
    emp_cov = torch.cov(x.T)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert torch.all((emp_cov - cov).abs() < 6 * se_cov), (emp_cov - cov) / se_cov
    # within each component, (x - t mu_i) / sqrt(var_i) is N(0, I): a sharper check of the spread
    z = (x - t * mu[idx]) / var[idx].sqrt()[:, None]
    assert torch.all(z.mean(0).abs() < 5 / math.sqrt(n))
    assert abs(float(z.pow(2).mean()) - 1) < 5 * math.sqrt(2 / (3 * n))
    freq = torch.bincount(idx, minlength=3).double() / n
    assert torch.all((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt())


def test_constructor_validation():
    with pytest.raises(ValueError):
        GaussianMixtureTeacher([1.0, 1.0], [[0.0, 0.0]], [1.0])
    with pytest.raises(ValueError):
        GaussianMixtureTeacher([1.0], [[0.0, 0.0]], [0.0])
    t = GaussianMixtureTeacher([2.0, 6.0], [[0.0], [1.0]], [1.0, 1.0])
    torch.testing.assert_close(t.weights, torch.tensor([0.25, 0.75]))
    assert t.to(dtype=torch.float64).means.dtype == torch.float64
