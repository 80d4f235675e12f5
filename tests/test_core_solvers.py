"""Fixed-grid solvers: convergence orders, per-sample grids, tuple states, the adaptive solve."""

from __future__ import annotations

import math

import pytest
import torch

from marflow_core import odeint_adaptive, odeint_fixed, uniform_grid

F64 = torch.float64
ORDERS = {"euler": 1, "heun": 2, "rk4": 4}


def _decay(x, t):
    return -x


def _time_dependent(x, t):
    """dx/dt = cos(t) x + sin(t): x(T) = e^{sin T} (x0 + int_0^T e^{-sin s} sin s ds)."""
    return torch.cos(t)[:, None] * x + torch.sin(t)[:, None]


def _time_dependent_exact(x0, t_end):
    s = torch.linspace(0, t_end, 200_001, dtype=F64)
    f = torch.exp(-torch.sin(s)) * torch.sin(s)
    integral = float(torch.trapezoid(f, s))  # smooth integrand: error ~ 1e-12 at this resolution
    return math.exp(math.sin(t_end)) * (x0 + integral)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_convergence_order_autonomous(method):
    x0 = torch.tensor([[1.0], [-2.0]], dtype=F64)
    exact = x0 * math.exp(-1.0)
    errs = []
    for n in [8, 16, 32]:
        x1 = odeint_fixed(_decay, x0, uniform_grid(0.0, 1.0, n, x0), method)
        errs.append(float((x1 - exact).abs().max()))
    for coarse, fine in zip(errs[:-1], errs[1:], strict=True):
        assert math.log2(coarse / fine) == pytest.approx(ORDERS[method], abs=0.2)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_convergence_order_time_dependent(method):
    """A non-autonomous ODE: wrong stage times would lower the observed order."""
    x0 = torch.tensor([[0.5], [1.5]], dtype=F64)
    exact = torch.tensor([[_time_dependent_exact(0.5, 2.0)], [_time_dependent_exact(1.5, 2.0)]])
    errs = []
    for n in [8, 16, 32]:
        x1 = odeint_fixed(_time_dependent, x0, uniform_grid(0.0, 2.0, n, x0), method)
        errs.append(float((x1 - exact.to(F64)).abs().max()))
    for coarse, fine in zip(errs[:-1], errs[1:], strict=True):
        assert math.log2(coarse / fine) == pytest.approx(ORDERS[method], abs=0.25)


def test_per_sample_grids_equal_separate_solves():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=gen, dtype=F64)
    t0 = torch.tensor([0.0, 0.25, 0.5, 0.1, 0.9], dtype=F64)
    t1 = torch.tensor([0.25, 0.5, 1.0, 0.7, 0.95], dtype=F64)
    grid = uniform_grid(t0, t1, 6, x0)
    assert grid.shape == (7, 5)
    batched = odeint_fixed(_time_dependent, x0, grid, "rk4")
    for b in range(5):
        one = odeint_fixed(_time_dependent, x0[b : b + 1], uniform_grid(float(t0[b]), float(t1[b]), 6, x0), "rk4")
        torch.testing.assert_close(batched[b : b + 1], one, rtol=1e-13, atol=1e-13)


def test_tuple_state_and_path():
    """(x, L) with x' = -x, L' = |x|^2: L(1) = |x0|^2 (1 - e^{-2}) / 2."""
    x0 = torch.tensor([[1.0, 2.0], [-0.5, 0.0]], dtype=F64)

    def f(state, t):
        x, _ = state
        return -x, x.pow(2).sum(-1)

    zero = torch.zeros(2, dtype=F64)
    (x1, l1), path = odeint_fixed(f, (x0, zero), uniform_grid(0.0, 1.0, 64, x0), "rk4", return_path=True)
    torch.testing.assert_close(x1, x0 * math.exp(-1), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(l1, x0.pow(2).sum(-1) * (1 - math.exp(-2)) / 2, rtol=1e-8, atol=1e-12)
    assert len(path) == 65 and path[0][0] is x0
    torch.testing.assert_close(path[32][0], x0 * math.exp(-0.5), rtol=1e-8, atol=1e-12)


def test_uniform_grid_and_errors():
    like = torch.zeros(3, dtype=F64)
    g = uniform_grid(0.2, 0.6, 4, like)
    torch.testing.assert_close(g, torch.tensor([0.2, 0.3, 0.4, 0.5, 0.6], dtype=F64))
    with pytest.raises(ValueError):
        uniform_grid(0.0, 1.0, 0, like)
    with pytest.raises(ValueError):
        odeint_fixed(_decay, like[:, None], g, "midpoint")
    with pytest.raises(ValueError):
        odeint_fixed(_decay, like[:, None], torch.zeros(5, 2, dtype=F64), "euler")  # wrong batch


def test_adaptive_solve_matches_closed_form():
    x0 = torch.tensor([[0.5], [1.5]], dtype=F64)
    x1 = odeint_adaptive(_time_dependent, x0, (0.0, 2.0), rtol=1e-10, atol=1e-10)
    exact = torch.tensor([[_time_dependent_exact(0.5, 2.0)], [_time_dependent_exact(1.5, 2.0)]], dtype=F64)
    torch.testing.assert_close(x1, exact, rtol=1e-8, atol=1e-9)


def test_solvers_are_differentiable():
    """d x(1) / d a for x' = a x is x0 e^a (rk4, fine grid)."""
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    x0 = torch.tensor([[1.3]], dtype=F64)
    x1 = odeint_fixed(lambda x, t: a * x, x0, uniform_grid(0.0, 1.0, 32, x0), "rk4")
    (g,) = torch.autograd.grad(x1.sum(), a)
    assert float(g) == pytest.approx(1.3 * math.exp(0.7), rel=1e-7)


def test_rk4_38_matches_torchdiffeq_rk4_on_a_fixed_grid():
    """torchdiffeq's fixed-grid "rk4" is Kutta's 3/8 rule: an independent implementation."""
    from torchdiffeq import odeint

    a = torch.tensor([[0.3, -1.1], [0.8, -0.2]], dtype=torch.float64)

    def f(x, t):  # nonlinear and time dependent
        return torch.tanh(x @ a.T) * (1 + t[:, None]) + torch.sin(3 * t)[:, None]

    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    ours = odeint_fixed(f, x0, grid, "rk4_38")
    theirs = odeint(lambda t, x: f(x, t.expand(x.shape[0])), x0, grid, method="rk4")[-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    classic = odeint_fixed(f, x0, grid, "rk4")
    assert float((classic - ours).abs().max()) > 1e-9  # a different scheme, not an alias
