"""Log-density tracking: linear fields in closed form, nonlinear fields against autograd Jacobians."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from marflow_core import (
    TimeMLP,
    euler_map_with_logdet,
    flow_with_logdet,
    odeint_fixed,
    sample_probes,
    uniform_grid,
)

F64 = torch.float64


class LinearField(nn.Module):
    """``v(x, t) = (A0 + t A1) x``."""

    def __init__(self, a0: torch.Tensor, a1: torch.Tensor | None = None) -> None:
        super().__init__()
        self.a0 = nn.Parameter(a0.clone())
        self.a1 = None if a1 is None else nn.Parameter(a1.clone())

    def forward(self, x, t):
        v = x @ self.a0.T
        if self.a1 is not None:
            v = v + t[:, None] * (x @ self.a1.T)
        return v


def _matrix(seed: int, d: int = 3, scale: float = 0.6) -> torch.Tensor:
    return scale * torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_linear_field_exact_divergence_logdet_and_endpoint():
    a = _matrix(0)
    field = LinearField(a)
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t0, t1 = 0.2, 0.9
    out = flow_with_logdet(field, x0, uniform_grid(t0, t1, 64, x0), "rk4", "exact")
    torch.testing.assert_close(out.logdet, torch.full((6,), float(a.trace()) * (t1 - t0), dtype=F64),
                               rtol=1e-12, atol=1e-12)
    expected = x0 @ torch.linalg.matrix_exp(a * (t1 - t0)).T
    torch.testing.assert_close(out.x, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out.delta_log_density, -out.logdet)
    assert not out.x.requires_grad and not out.logdet.requires_grad


def test_time_dependent_linear_field_logdet_with_per_sample_grids():
    """div = tr(A0) + t tr(A1): logdet = tr(A0) (t1 - t0) + tr(A1) (t1^2 - t0^2) / 2 (rk4 exact)."""
    a0, a1 = _matrix(2), _matrix(3)
    field = LinearField(a0, a1)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    t0 = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=F64)
    t1 = t0 + 0.25
    out = flow_with_logdet(field, x0, uniform_grid(t0, t1, 3, x0), "rk4", "exact")
    expected = float(a0.trace()) * (t1 - t0) + float(a1.trace()) * (t1**2 - t0**2) / 2
    torch.testing.assert_close(out.logdet, expected, rtol=1e-12, atol=1e-12)


def test_pushforward_log_density_of_linear_flow():
    """log q(y) = log N(x; 0, I) - logdet equals log N(y; 0, M M^T) with M = expm(A)."""
    a = _matrix(5)
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    out = flow_with_logdet(LinearField(a), x0, uniform_grid(0.0, 1.0, 64, x0), "rk4")
    log_p0 = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    m = torch.linalg.matrix_exp(a)
    q = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=F64), m @ m.T)
    torch.testing.assert_close(log_p0.log_prob(x0) + out.delta_log_density, q.log_prob(out.x),
                               rtol=1e-8, atol=1e-8)


def test_hutchinson_on_diagonal_linear_field_is_exact():
    """Rademacher e: e^T diag(d) e = sum(d) exactly."""
    a = torch.diag(torch.tensor([0.3, -1.2, 0.5], dtype=F64))
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = flow_with_logdet(LinearField(a), x0, uniform_grid(0.0, 0.5, 8, x0), "rk4", "hutchinson",
                           n_probes=1, probe_kind="rademacher", generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out.logdet, torch.full((5,), -0.2, dtype=F64), rtol=1e-12, atol=1e-12)


def test_hutchinson_on_general_linear_field():
    """Per sample logdet = T e^T A e for one fixed Rademacher probe e; the batch mean -> T tr(A)."""
    a = _matrix(9)
    n, t_len = 20_000, 0.5
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    out = flow_with_logdet(LinearField(a), x0, uniform_grid(0.0, t_len, 4, x0), "rk4", "hutchinson",
                           n_probes=1, generator=torch.Generator().manual_seed(11))
    # the probe does not touch the state: the end points are those of the plain rk4 solve
    plain = odeint_fixed(LinearField(a), x0, uniform_grid(0.0, t_len, 4, x0), "rk4").detach()
    torch.testing.assert_close(out.x, plain, rtol=1e-14, atol=1e-14)
    # every value is T e^T A e for one of the 2^3 sign vectors, and several values occur
    support = torch.tensor([t_len * float(torch.tensor(e, dtype=F64) @ a @ torch.tensor(e, dtype=F64))
                            for e in itertools.product([-1.0, 1.0], repeat=3)], dtype=F64)
    nearest = (out.logdet[:, None] - support[None, :]).abs().min(1).values
    assert float(nearest.max()) < 1e-12
    assert len(torch.unique(out.logdet.round(decimals=9))) > 1
    # unbiased: Var(e^T A e) = 2 sum_{i != j} S_ij^2 for Rademacher e, S = (A + A^T) / 2
    sym = 0.5 * (a + a.T)
    var = 2 * (sym.pow(2).sum() - sym.diagonal().pow(2).sum()) * t_len**2
    se = math.sqrt(float(var) / n)
    assert abs(float(out.logdet.mean()) - t_len * float(a.trace())) < 5 * se
    # the same probes, re-derived from the same seed, give exactly T e^T A e per sample
    e = sample_probes(x0, 1, "rademacher", torch.Generator().manual_seed(11))[0]
    torch.testing.assert_close(out.logdet, t_len * ((e @ a.T) * e).sum(-1), rtol=1e-12, atol=1e-12)


def test_euler_map_logdet_linear_field_and_folding():
    """logdet = sum_n log|det(I + h_n A)| (numpy), x = prod_n (I + h_n A) x0; folds are counted."""
    a = _matrix(12, scale=1.0)
    grid = torch.tensor([0.0, 0.1, 0.35, 0.6, 1.0], dtype=F64)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(13), dtype=F64)
    out = euler_map_with_logdet(LinearField(a), x0, grid)
    a_np, steps = a.numpy(), np.diff(grid.numpy())
    logdet = sum(math.log(abs(np.linalg.det(np.eye(3) + h * a_np))) for h in steps)
    m = np.eye(3)
    for h in steps:
        m = (np.eye(3) + h * a_np) @ m
    np.testing.assert_allclose(out.logdet.numpy(), logdet, rtol=1e-12)
    np.testing.assert_allclose(out.x.numpy(), x0.numpy() @ m.T, rtol=1e-12, atol=1e-12)
    assert out.n_folded == 0
    # one eigenvalue -3 with h = 0.5: det(I + h A) = (-0.5)(1.5) < 0 -> every sample folds
    folding = LinearField(torch.diag(torch.tensor([-3.0, 1.0], dtype=F64)))
    x2 = torch.randn(5, 2, generator=torch.Generator().manual_seed(14), dtype=F64)
    folded = euler_map_with_logdet(folding, x2, torch.tensor([0.0, 0.5], dtype=F64))
    assert folded.n_folded == 5
    torch.testing.assert_close(folded.logdet, torch.full((5,), math.log(0.75), dtype=F64))


@pytest.fixture
def mlp3() -> TimeMLP:
    torch.manual_seed(0)
    return TimeMLP(3, 32, 2, time_dim=8).double()


def _map_logdets(fn, x):
    """slogdet of per-sample Jacobians of a batch-independent map: d sum_b y_b / d x is (D, B, D)."""
    jac = torch.autograd.functional.jacobian(lambda z: fn(z).sum(0), x).permute(1, 0, 2)
    return torch.linalg.slogdet(jac)


def test_euler_map_logdet_nonlinear_matches_autograd_of_whole_map(mlp3):
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64)
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(15), dtype=F64)
    out = euler_map_with_logdet(mlp3, x0, grid)
    sign, logabs = _map_logdets(lambda x: odeint_fixed(mlp3, x, grid, "euler"), x0)
    torch.testing.assert_close(out.logdet, logabs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.x, odeint_fixed(mlp3, x0, grid, "euler").detach())
    assert out.n_folded == int((sign <= 0).sum())


def test_flow_logdet_nonlinear_matches_log_det_of_flow_map(mlp3):
    """int div v ds (augmented ODE) = log|det d Phi / dx| of the rk4 flow map, up to O(h^4)."""
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(16), dtype=F64)
    grid = uniform_grid(0.1, 0.9, 40, x0)
    out = flow_with_logdet(mlp3, x0, grid, "rk4", "exact")
    _, logabs = _map_logdets(lambda x: odeint_fixed(mlp3, x, grid, "rk4"), x0)
    torch.testing.assert_close(out.logdet, logabs, rtol=1e-6, atol=1e-7)
    assert float(out.logdet.abs().max()) > 1e-2  # non-trivial volume change


def test_flow_with_logdet_create_graph_is_differentiable():
    """v = a x in D dims: logdet = D a T, so d logdet / d a = D T; x1 = e^{aT} x0."""
    a = nn.Parameter(torch.tensor(0.4, dtype=F64))
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(17), dtype=F64)
    out = flow_with_logdet(lambda x, t: a * x, x0, uniform_grid(0.0, 0.5, 16, x0), "rk4",
                           create_graph=True)
    (g,) = torch.autograd.grad(out.logdet.sum(), a, retain_graph=True)
    assert float(g) == pytest.approx(3 * 2 * 0.5, rel=1e-12)
    (gx,) = torch.autograd.grad(out.x.sum(), a)
    assert float(gx) == pytest.approx(float(x0.sum()) * 0.5 * math.exp(0.2), rel=1e-7)


def test_unknown_divergence_kind_raises():
    x0 = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError):
        flow_with_logdet(lambda x, t: x, x0, uniform_grid(0.0, 1.0, 2, x0), "rk4", "bogus")


def test_euler_map_logdet_per_sample_grids_with_unequal_steps():
    """A ``(n+1, B)`` grid with different, unequal steps per sample: per sample b (numpy),
    logdet_b = sum_n log|det(I + h_nb A)| and x_b = prod_n (I + h_nb A) x0_b."""
    a = _matrix(18, scale=1.0)
    steps = np.array([[0.05, 0.30, 0.15],
                      [0.40, 0.10, 0.20],
                      [0.25, 0.25, 0.02],
                      [0.10, 0.45, 0.30]]).T  # (n, B): column b is sample b's steps
    starts = np.array([0.0, 0.1, 0.2, 0.05])
    grid = torch.tensor(np.vstack([starts, starts + np.cumsum(steps, axis=0)]), dtype=F64)  # (n+1, B)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(19), dtype=F64)
    out = euler_map_with_logdet(LinearField(a), x0, grid)
    a_np, eye = a.numpy(), np.eye(3)
    for b in range(4):
        logdet = sum(math.log(abs(np.linalg.det(eye + h * a_np))) for h in steps[:, b])
        m = eye
        for h in steps[:, b]:
            m = (eye + h * a_np) @ m
        assert float(out.logdet[b]) == pytest.approx(logdet, rel=1e-12, abs=1e-13)
        np.testing.assert_allclose(out.x[b].numpy(), m @ x0[b].numpy(), rtol=1e-12, atol=1e-12)
    assert float(out.logdet.max() - out.logdet.min()) > 0.1  # the per-sample steps matter
