"""Flow map matching and Local Flow Matching against closed forms (float64).

FMM: a Gaussian teacher ``N(mu, sigma^2 I)`` (an affine, "linear" velocity) has the exact flow map
``X_{s,t}(x) = t mu + r(t) / r(s) (x - s mu)`` with ``r(t)^2 = t^2 sigma^2 + (1 - t)^2`` (the
standardised coordinate ``(x - t mu) / r(t)`` is conserved along the flow); derived here, checked
against an RK4 solve of the teacher ODE, then used as the map the losses must vanish on.

LFM: Gaussian data stays Gaussian along the OU chain, ``x_n ~ N(e^{-H_n} mu, (e^{-2H_n} sigma^2 + 1 -
e^{-2H_n}) I)``; an affine block field ``v = A + B x`` carries a Gaussian's mean by ``m' = A + B m`` and
its variance by ``V' = 2 B V`` (the continuity equation), which checks the analytic block velocity
independently of its conditional-expectation formula; the chain's likelihood then equals the data's
exact log-density.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marflow_core import GaussianMixtureTeacher, odeint_fixed, uniform_grid
from marflow_core.flow_map import (
    FlowMapDistillationObjective,
    FlowMapMatchingObjective,
    TwoTimeMLP,
    compose,
    compose_with_logdet,
    eulerian_residual,
    time_derivative,
)
from marflow_core.local_flow import (
    BlockwiseField,
    GaussianBlockVelocity,
    LocalFlowChain,
    LocalFlowDistillationObjective,
    LocalFlowMatchingObjective,
    block_end_points,
    generate,
    log_likelihood,
)

DT = torch.float64
MU = torch.tensor([1.5, -0.5], dtype=DT)
SIGMA = 0.4


def r(t: torch.Tensor) -> torch.Tensor:
    return (t**2 * SIGMA**2 + (1 - t) ** 2).sqrt()


class ExactMap(nn.Module):
    """The Gaussian teacher's exact two-time flow map, times ``scale`` on the displacement (1: exact)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x, s, t):
        s, t = s[:, None], t[:, None]
        exact = t * MU + r(t) / r(s) * (x - s * MU)
        return x + self.scale * (exact - x)


@pytest.fixture
def teacher():
    return GaussianMixtureTeacher([1.0], MU[None].tolist(), [SIGMA], dtype=DT)


def test_closed_form_flow_map_is_the_teachers_flow(teacher):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=gen, dtype=DT)
    s, t = 0.2, 0.9
    solved = odeint_fixed(lambda y, tt: teacher.velocity(y, tt), x, uniform_grid(s, t, 200, x), "rk4")
    exact = ExactMap()(x, torch.full((64,), s, dtype=DT), torch.full((64,), t, dtype=DT))
    assert torch.allclose(solved, exact, atol=1e-10)


@pytest.mark.parametrize("kind", ["lagrangian", "eulerian"])
def test_distillation_losses_vanish_on_the_exact_map_only(teacher, kind):
    x1 = teacher.sample(4096, 1.0, torch.Generator().manual_seed(1))
    objective = FlowMapDistillationObjective(teacher, kind=kind, ordered=kind == "lagrangian")
    exact = objective(ExactMap(), x1, 0, torch.Generator().manual_seed(2)).total
    wrong = objective(ExactMap(0.97), x1, 0, torch.Generator().manual_seed(2)).total
    assert float(exact) < 1e-20 and float(wrong) > 1e-4


def test_time_derivatives_match_finite_differences(teacher):
    torch.manual_seed(0)
    net = TwoTimeMLP(2, hidden=16, depth=2, time_dim=8).to(DT)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, generator=gen, dtype=DT)
    s, t = torch.rand(8, generator=gen, dtype=DT), torch.rand(8, generator=gen, dtype=DT)
    eps = 1e-6
    _, dt_x = time_derivative(net, x, s, t)
    fd_t = (net(x, s, t + eps) - net(x, s, t - eps)) / (2 * eps)
    assert torch.allclose(dt_x, fd_t, atol=1e-7)
    b = teacher.velocity(x, s)
    fd_euler = (net(x + eps * b, s + eps, t) - net(x - eps * b, s - eps, t)) / (2 * eps)
    assert torch.allclose(eulerian_residual(net, teacher.velocity, x, s, t), fd_euler, atol=1e-7)
    assert torch.equal(net(x, s, s), x)  # X_{s,s} = id by construction


def test_composed_exact_maps_reproduce_the_map_and_the_exact_density(teacher):
    x0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(4), dtype=DT)
    grid = torch.tensor([0.0, 0.3, 0.55, 0.8, 1.0], dtype=DT)
    one = torch.zeros(512, dtype=DT)
    direct = ExactMap()(x0, one, one + 1)
    assert torch.allclose(compose(ExactMap(), x0, grid), direct, atol=1e-12)
    flow = compose_with_logdet(ExactMap(), x0, grid)
    assert torch.allclose(flow.x, direct, atol=1e-12) and flow.n_folded == 0
    log_q = -0.5 * x0.pow(2).sum(-1) - math.log(2 * math.pi) - flow.logdet
    assert torch.allclose(log_q, teacher.log_prob(flow.x, 1.0), atol=1e-10)
    folded = compose_with_logdet(lambda x, s, t: -x, x0, grid[:2])
    assert folded.n_folded == 0  # det(-I) = +1 in 2-D: a rotation, not a fold
    assert compose_with_logdet(lambda x, s, t: x * torch.tensor([1.0, -1.0], dtype=DT), x0, grid[:2]).n_folded == 512


def test_direct_loss_at_the_exact_map_is_the_interpolants_conditional_variance(teacher):
    """At the exact map: invertibility 0, consistency ``E |b(I_t, t) - (x1 - x0)|^2 = D E_t[sigma^2 / r(t)^2]``
    (the conditional variance of ``x1 - x0`` given ``I_t``, derived in closed form per dimension)."""
    n = 200_000
    x1 = teacher.sample(n, 1.0, torch.Generator().manual_seed(5))
    terms = FlowMapMatchingObjective()(ExactMap(), x1, 0, torch.Generator().manual_seed(6))
    tt = torch.linspace(0, 1, 20001, dtype=DT)
    closed = 2 * torch.trapezoid(SIGMA**2 / r(tt) ** 2, tt)
    assert terms.parts["invertibility"] < 1e-20
    # the per-sample term is sigma^2 / r(t)^2 times a chi-square(2) variable: SE below 2 / sqrt(n) * max
    se = 2 * float((SIGMA**2 / r(tt) ** 2).max()) / math.sqrt(n)
    assert abs(terms.parts["consistency"] - float(closed)) < 4 * se
    wrong = FlowMapMatchingObjective()(ExactMap(0.97), x1, 0, torch.Generator().manual_seed(6))
    assert wrong.parts["invertibility"] > 0 and float(wrong.total) > float(terms.total)


def test_flow_map_objectives_train_a_network_through_jvp(teacher):
    torch.manual_seed(0)
    net = TwoTimeMLP(2, hidden=32, depth=2, time_dim=8).to(DT)
    x1 = teacher.sample(256, 1.0, torch.Generator().manual_seed(7))
    for objective in (FlowMapDistillationObjective(teacher), FlowMapDistillationObjective(teacher, "eulerian"),
                      FlowMapMatchingObjective()):
        net.zero_grad()
        objective(net, x1, 0, torch.Generator().manual_seed(8)).total.backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


# -- Local Flow Matching ------------------------------------------------------------------------------
CHAIN = LocalFlowChain((0.3, 0.5, 0.8))


def test_ou_chain_pairs_have_the_closed_form_marginals():
    n = 400_000
    gen = torch.Generator().manual_seed(10)
    x0 = MU + SIGMA * torch.randn(n, 2, generator=gen, dtype=DT)
    for block in range(1, CHAIN.n_blocks + 1):
        clean, noisy = CHAIN.pair(x0, torch.full((n,), block), gen)
        h_prev = sum(CHAIN.step_sizes[: block - 1])
        m_prev, v_prev = math.exp(-h_prev) * MU, math.exp(-2 * h_prev) * SIGMA**2 + 1 - math.exp(-2 * h_prev)
        if block < CHAIN.n_blocks:
            h = h_prev + CHAIN.step_sizes[block - 1]
            m_next, v_next = math.exp(-h) * MU, math.exp(-2 * h) * SIGMA**2 + 1 - math.exp(-2 * h)
            cov = math.exp(-CHAIN.step_sizes[block - 1]) * v_prev
        else:
            m_next, v_next, cov = torch.zeros(2, dtype=DT), 1.0, 0.0
        for got, mean, var in ((clean, m_prev, v_prev), (noisy, m_next, v_next)):
            assert torch.allclose(got.mean(0), torch.as_tensor(mean, dtype=DT), atol=5 * math.sqrt(var / n))
            assert torch.allclose(got.var(0), torch.full((2,), var, dtype=DT), atol=5 * var * math.sqrt(2 / n))
        got_cov = ((clean - clean.mean(0)) * (noisy - noisy.mean(0))).mean(0)
        assert torch.allclose(got_cov, torch.full((2,), cov, dtype=DT), atol=5 * math.sqrt(v_prev * v_next / n))


def gaussian_blocks() -> BlockwiseField:
    """Window ``w`` holds block ``N - w``."""
    return BlockwiseField([GaussianBlockVelocity(CHAIN, CHAIN.n_blocks - w, MU, SIGMA)
                           for w in range(CHAIN.n_blocks)])


def test_analytic_block_carries_its_gaussian_to_the_next():
    """Mean and variance ODEs of the affine block field (``A = v(0)``, ``B = v(e_1) - v(0)``), by RK4."""
    for block in range(1, CHAIN.n_blocks + 1):
        field = GaussianBlockVelocity(CHAIN, block, MU, SIGMA)
        h_prev = sum(CHAIN.step_sizes[: block - 1])
        m_clean = math.exp(-h_prev) * MU
        v_clean = math.exp(-2 * h_prev) * SIGMA**2 + 1 - math.exp(-2 * h_prev)
        a = CHAIN.decay(block)

        def moments(state, tau, field=field):
            mean, var = state
            zero = torch.zeros(1, 2, dtype=DT)
            offset = field(zero, tau[:1])
            slope = field(torch.tensor([[1.0, 0.0]], dtype=DT), tau[:1]) - offset
            return offset + slope[:, :1] * mean, 2 * slope[:, :1] * var

        start = (a * m_clean[None], torch.tensor([[a * a * v_clean + 1 - a * a]], dtype=DT))
        mean, var = odeint_fixed(moments, start, uniform_grid(0.0, 1.0, 400, start[0]), "rk4")
        assert torch.allclose(mean[0], m_clean, atol=1e-9) and abs(float(var) - v_clean) < 1e-9


def test_chain_likelihood_of_analytic_gaussian_blocks_is_exact():
    x = MU + SIGMA * torch.randn(32, 2, generator=torch.Generator().manual_seed(11), dtype=DT)
    exact = GaussianMixtureTeacher([1.0], MU[None].tolist(), [SIGMA], dtype=DT).log_prob(x, 1.0)
    assert torch.allclose(log_likelihood(gaussian_blocks(), x, steps=64), exact, atol=1e-6)
    # and generating from noise lands on the data law (mean and variance)
    z = torch.randn(100_000, 2, generator=torch.Generator().manual_seed(12), dtype=DT)
    y = generate(gaussian_blocks(), z, 32, "rk4")
    assert torch.allclose(y.mean(0), MU, atol=5 * SIGMA / math.sqrt(len(z)))
    assert torch.allclose(y.std(0), torch.full((2,), SIGMA, dtype=DT), atol=5 * SIGMA / math.sqrt(len(z)))


def test_blockwise_field_reads_global_time_window_by_window():
    field = gaussian_blocks()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(13), dtype=DT)
    for w in range(CHAIN.n_blocks):
        for tau in (0.0, 0.4):
            t = torch.full((5,), (w + tau) / CHAIN.n_blocks, dtype=DT)
            expected = CHAIN.n_blocks * field.block(w)(x, torch.full((5,), tau, dtype=DT))
            assert torch.allclose(field(x, t), expected, atol=1e-12)


def test_flow_matching_loss_is_smallest_at_the_analytic_blocks():
    x0 = MU + SIGMA * torch.randn(50_000, 2, generator=torch.Generator().manual_seed(14), dtype=DT)
    objective = LocalFlowMatchingObjective(CHAIN)
    exact = objective(gaussian_blocks(), x0, 0, torch.Generator().manual_seed(15)).total

    class Off(nn.Module):
        def __init__(self, inner, scale):
            super().__init__()
            self.inner, self.scale = inner, scale

        def forward(self, x, tau):
            return self.scale * self.inner(x, tau)

    for scale in (0.95, 1.05):  # a minimum, not a slope: both sides are worse
        off = BlockwiseField([Off(b, scale) for b in gaussian_blocks().blocks])
        assert float(exact) < float(objective(off, x0, 0, torch.Generator().manual_seed(15)).total)


def test_one_step_student_of_the_exact_block_maps_has_zero_distillation_loss():
    """The exact block map of Gaussian blocks is affine: ``x -> m + s / r (x - a m)``; a student whose one
    Euler step is that map (velocity ``T(x) - x``, constant in tau) has loss at the RK4 error only."""
    class OneStep(nn.Module):
        def __init__(self, block):
            super().__init__()
            h_prev = sum(CHAIN.step_sizes[: block - 1])
            self.m = math.exp(-h_prev) * MU
            self.s = math.sqrt(math.exp(-2 * h_prev) * SIGMA**2 + 1 - math.exp(-2 * h_prev))
            self.a = CHAIN.decay(block)
            self.r = math.sqrt(self.a**2 * self.s**2 + 1 - self.a**2)

        def forward(self, x, tau):
            return self.m + self.s / self.r * (x - self.a * self.m) - x

    student = BlockwiseField([OneStep(CHAIN.n_blocks - w) for w in range(CHAIN.n_blocks)])
    z = torch.randn(2048, 2, generator=torch.Generator().manual_seed(16), dtype=DT)
    objective = LocalFlowDistillationObjective(gaussian_blocks(), steps=1, teacher_steps=32)
    assert float(objective(student, z, 0, None).total) < 1e-12
    assert float(LocalFlowDistillationObjective(gaussian_blocks(), steps=2, teacher_steps=32)(
        student, z, 0, None).total) > 1e-4  # two steps of the same field overshoot
    points = block_end_points(gaussian_blocks(), z, 32)
    assert len(points) == CHAIN.n_blocks + 1


def test_chain_refuses_bad_step_sizes():
    for bad in ((0.0,), (-1.0, 0.5), (math.inf,), (math.nan,)):
        with pytest.raises(ValueError, match="step_sizes"):
            LocalFlowChain(bad)
