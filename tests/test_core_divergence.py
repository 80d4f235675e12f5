"""Exact and Hutchinson divergences against independently computed Jacobians."""

from __future__ import annotations

import pytest
import torch

from marflow_core import (
    TimeMLP,
    batch_jacobian,
    exact_divergence,
    hutchinson_divergence,
    sample_probes,
)

F64 = torch.float64
D = 5


@pytest.fixture
def mlp5() -> TimeMLP:
    torch.manual_seed(0)
    return TimeMLP(D, 32, 2, time_dim=8).double()


@pytest.fixture
def points():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, D, generator=gen, dtype=F64)
    t = torch.rand(4, generator=gen, dtype=F64)
    return x, t


def _jacobians(model, x, t):
    """Per-sample Jacobians with torch.autograd.functional.jacobian (an independent route)."""
    return torch.stack([
        torch.autograd.functional.jacobian(lambda xi, b=b: model(xi[None], t[b : b + 1])[0], x[b])
        for b in range(x.shape[0])
    ])


def test_exact_divergence_and_jacobian_match_functional_jacobian(mlp5, points):
    x, t = points
    jac = _jacobians(mlp5, x, t)
    v, j = batch_jacobian(mlp5, x, t)
    torch.testing.assert_close(j, jac, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, mlp5(x, t).detach(), rtol=0, atol=0)
    v2, div = exact_divergence(mlp5, x, t)
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-10, atol=1e-12)
    assert not div.requires_grad and not v2.requires_grad
    # non-trivial field: the Jacobian is not symmetric, so Hutchinson has off-diagonal variance
    assert (jac - jac.transpose(1, 2)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(mlp5, points, kind):
    """Mean over 20000 probes within 5 standard errors (computed from the exact Jacobian)."""
    x, t = points
    jac = _jacobians(mlp5, x, t)
    sym = 0.5 * (jac + jac.transpose(1, 2))
    if kind == "rademacher":  # Var = 2 sum_{i != j} S_ij^2
        off = sym - torch.diag_embed(sym.diagonal(dim1=1, dim2=2))
        var = 2 * off.pow(2).sum((1, 2))
    else:  # Var = 2 ||S||_F^2
        var = 2 * sym.pow(2).sum((1, 2))
    n = 20_000
    probes = sample_probes(x, n, kind, torch.Generator().manual_seed(2))
    assert probes.shape == (n, 4, D)
    _, div_hat = hutchinson_divergence(mlp5, x, t, probes)
    exact = jac.diagonal(dim1=1, dim2=2).sum(-1)
    se = (var / n).sqrt()
    assert torch.all((div_hat - exact).abs() < 5 * se), ((div_hat - exact) / se)
    # a single probe is not the trace (the test above is not vacuous)
    _, one = hutchinson_divergence(mlp5, x, t, probes[:1])
    assert (one - exact).abs().max() > 1e-4


def test_hutchinson_with_scaled_basis_probes_is_exact(mlp5, points):
    """Probes sqrt(D) e_i (i = 1..D) have E[e e^T] = I and give mean_i D J_ii = tr J exactly."""
    x, t = points
    basis = (D**0.5) * torch.eye(D, dtype=F64)[:, None, :].expand(D, x.shape[0], D)
    _, div_hat = hutchinson_divergence(mlp5, x, t, basis)
    exact = _jacobians(mlp5, x, t).diagonal(dim1=1, dim2=2).sum(-1)
    torch.testing.assert_close(div_hat, exact, rtol=1e-10, atol=1e-12)


def test_probe_moments():
    like = torch.zeros(3, 4, dtype=F64)
    r = sample_probes(like, 50_000, "rademacher", torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    g = sample_probes(like, 50_000, "gaussian", torch.Generator().manual_seed(0))
    for e in (r, g):
        second = torch.einsum("pbi,pbj->bij", e, e) / e.shape[0]
        torch.testing.assert_close(second, torch.eye(4, dtype=F64).expand(3, 4, 4), rtol=0, atol=0.04)
    with pytest.raises(ValueError):
        sample_probes(like, 1, "uniform")
    with pytest.raises(ValueError):
        sample_probes(like, 0)


def test_create_graph_divergence_gradient_matches_finite_differences(mlp5, points):
    """d/d theta of sum_b div v(x_b) along a random parameter direction, vs central differences."""
    x, t = points
    params = list(mlp5.parameters())
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
    _, div = exact_divergence(mlp5, x, t, create_graph=True)
    grads = torch.autograd.grad(div.sum(), params, allow_unused=True)  # the output bias is unused
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True) if g is not None)

    def total(sign: float, eps: float = 1e-6) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
        value = float(exact_divergence(mlp5, x, t)[1].sum())
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    fd = (total(1.0) - total(-1.0)) / 2e-6
    assert float(analytic) == pytest.approx(fd, rel=1e-6, abs=1e-8)

    probes = sample_probes(x, 3, "gaussian", torch.Generator().manual_seed(4))
    _, hdiv = hutchinson_divergence(mlp5, x, t, probes, create_graph=True)
    assert hdiv.requires_grad


def test_divergence_of_image_shaped_input():
    """x: (B, C, H, W); v = A x (flattened): the trace is tr(A) for every sample."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(12, 12, generator=gen, dtype=F64)

    def field(x, t):
        return (x.flatten(1) @ a.T).reshape(x.shape)

    x = torch.randn(3, 3, 2, 2, generator=gen, dtype=F64)
    _, div = exact_divergence(field, x, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(div, torch.full((3,), float(a.trace()), dtype=F64), rtol=1e-12, atol=1e-12)


def test_plain_callable_takes_the_vjp_route_and_agrees(mlp5, points):
    """A lambda has no ``jacobian`` method: the batched VJP must give the same Jacobian."""
    x, t = points
    jac = _jacobians(mlp5, x, t)
    v, j = batch_jacobian(lambda z, s: mlp5(z, s), x, t, method="reverse")
    torch.testing.assert_close(j, jac, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, mlp5(x, t).detach(), rtol=0, atol=0)


def test_forward_jacobian_parameter_gradients_match_double_backward(mlp5, points):
    """d tr(J) / d theta through TimeMLP.jacobian equals the double-backward route of the VJP."""
    x, t = points
    params = list(mlp5.parameters())
    def grads(field):  # the output bias does not enter J: its gradient is zero (None)
        _, div = exact_divergence(field, x, t, create_graph=True)
        out = torch.autograd.grad(div.pow(2).sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out, strict=True)]

    grads_fwd, grads_vjp = grads(mlp5), grads(lambda z, s: mlp5(z, s))
    assert any(float(g.abs().max()) > 1e-3 for g in grads_fwd)
    for a, b in zip(grads_fwd, grads_vjp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_finite_difference_divergence_is_exact_for_a_linear_field():
    """e . (A (x + s e) - A x) / s = e^T A e: the Hutchinson estimate itself, to round-off."""
    from marflow_core.divergence import finite_difference_divergence

    a = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.zeros(6, dtype=F64)
    probes = sample_probes(x, 3, "rademacher", torch.Generator().manual_seed(5))
    _, fd = finite_difference_divergence(lambda z, s: z @ a.T, x, t, probes, 1e-3)
    expected = torch.einsum("pbi,ij,pbj->b", probes, a, probes) / 3
    torch.testing.assert_close(fd, expected, rtol=1e-9, atol=1e-9)


def test_finite_difference_divergence_bias_is_first_order(mlp5, points):
    """Against the VJP Hutchinson estimate with the same probes the error shrinks like the step;
    averaged over many probes both approach the exact trace (the bias stays O(step))."""
    from marflow_core.divergence import finite_difference_divergence

    x, t = points
    probes = sample_probes(x, 20_000, "rademacher", torch.Generator().manual_seed(6))
    _, vjp = hutchinson_divergence(mlp5, x, t, probes)
    errors = []
    for step in (1e-2, 1e-3):
        _, fd = finite_difference_divergence(mlp5, x, t, probes, step)
        errors.append(float((fd - vjp).abs().max()))
    assert 1e-9 < errors[1] < errors[0] and 5 < errors[0] / errors[1] < 20  # O(step), not round-off
    jac = _jacobians(mlp5, x, t)  # independent route: the trace and the Rademacher variance
    sym = 0.5 * (jac + jac.transpose(1, 2))
    off = sym - torch.diag_embed(sym.diagonal(dim1=1, dim2=2))
    se = (2 * off.pow(2).sum((1, 2)) / probes.shape[0]).sqrt()
    _, fd = finite_difference_divergence(mlp5, x, t, probes, 1e-3)
    trace = jac.diagonal(dim1=1, dim2=2).sum(-1)
    assert torch.all((fd - trace).abs() < 5 * se + errors[1])
