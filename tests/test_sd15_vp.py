"""The eps (VP) adapter, docs/method.md section 7: every equation against closed forms or numpy."""

import math

import numpy as np
import pytest
import torch

from marflow_core.errors import InvalidParameter
from marflow_core.windows import segment_velocity
from replication.sd15.vp import (
    EpsWindowConfig,
    VPSchedule,
    abar_at,
    abar_at_index,
    ddim_step,
    eps_target,
    make_betas,
    sd15_alphas_cumprod,
    segment_coefficients,
    student_target,
    t_from_tau,
    tau_from_t,
    teacher_score,
    teacher_window_solve,
    velocity_target,
    vp_marginal,
    window_abars,
    window_bounds_tau,
    window_coefficients,
    window_end_from_eps,
    window_index_of_tau,
)

F64 = torch.float64


def numpy_sd15_table() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1.0 - betas)


def test_sd15_schedule_matches_numpy_and_known_values():
    table = sd15_alphas_cumprod()
    np.testing.assert_allclose(table.numpy(), numpy_sd15_table(), rtol=1e-12)
    assert table[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    assert table[-1].item() == pytest.approx(0.00466, abs=1e-5)  # SD 1.5's terminal abar (not 0)
    assert torch.allclose(VPSchedule().alphas_cumprod(), table)
    linear = make_betas(10, 0.1, 0.2, "linear")
    np.testing.assert_allclose(linear.numpy(), np.linspace(0.1, 0.2, 10))
    cos = make_betas(4, beta_schedule="squaredcos_cap_v2").numpy()
    f = [math.cos((s / 4 + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(5)]
    np.testing.assert_allclose(cos, [min(1 - f[i + 1] / f[i], 0.999) for i in range(4)], rtol=1e-12)


def test_tau_t_round_trip_and_endpoints():
    t = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0], dtype=F64)
    tau = tau_from_t(t, 1000)
    assert tau.tolist() == pytest.approx([1000.0, 750.0, 500.0, 1.0, 0.0])
    assert torch.allclose(t_from_tau(tau, 1000), t)
    tau2 = torch.tensor([3.0, 417.5, 999.0], dtype=F64)
    assert torch.allclose(tau_from_t(t_from_tau(tau2, 1000), 1000), tau2)


def test_abar_lookup_table_convention_and_interpolation():
    table = sd15_alphas_cumprod()
    np_table = numpy_sd15_table()
    tau = torch.tensor([1000, 750, 1, 0], dtype=torch.long)  # SD time: index tau - 1, clamped at 0
    np.testing.assert_allclose(abar_at(table, tau).numpy(), np_table[[999, 749, 0, 0]], rtol=1e-12)
    half = abar_at_index(table, torch.tensor([10.5, -3.0, 1200.0], dtype=F64))
    np.testing.assert_allclose(half.numpy(), [(np_table[10] + np_table[11]) / 2, np_table[0], np_table[-1]],
                               rtol=1e-12)
    assert abar_at(table, torch.tensor([500.0], dtype=torch.float32)).dtype == torch.float32


def test_window_coefficients_hand_computed():
    s, e = torch.tensor([0.3], dtype=F64), torch.tensor([0.7], dtype=F64)
    lam, eta_ddim = window_coefficients(s, e, "ddim_eps")
    _, eta_diff = window_coefficients(s, e, "diff_eps")
    assert lam.item() == pytest.approx(1.5275252316519468, rel=1e-12)  # sqrt(7/3)
    assert eta_ddim.item() == pytest.approx(0.5477225575051661 - 1.2780193008453875, rel=1e-12)
    assert eta_diff.item() == pytest.approx(-1.1547005383792515, rel=1e-12)  # -sqrt(4/3)
    with pytest.raises(InvalidParameter, match="velocity"):
        window_coefficients(s, e, "velocity")


def test_window_bounds_index_and_abars():
    k = torch.tensor([0, 1, 2, 3])
    tau_s, tau_e = window_bounds_tau(k, 4, 1000)
    assert tau_s.tolist() == [1000, 750, 500, 250] and tau_e.tolist() == [750, 500, 250, 0]
    taus = torch.tensor([1000, 916, 751, 750, 501, 500, 250, 1, 0])
    assert window_index_of_tau(taus, 4, 1000).tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3]
    abar_s, abar_e = window_abars(sd15_alphas_cumprod(), k, 4)
    np_table = numpy_sd15_table()
    np.testing.assert_allclose(abar_s.numpy(), np_table[[999, 749, 499, 249]], rtol=1e-12)
    np.testing.assert_allclose(abar_e.numpy(), np_table[[749, 499, 249, 0]], rtol=1e-12)


def test_ddim_step_textbook_and_ddim_eps_is_one_ddim_jump():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    a_t, a_p = torch.tensor([0.1, 0.4, 0.8], dtype=F64), torch.tensor([0.3, 0.5, 0.99], dtype=F64)
    xn, en, at, ap = x.numpy(), eps.numpy(), a_t.numpy()[:, None], a_p.numpy()[:, None]
    x0 = (xn - np.sqrt(1 - at) * en) / np.sqrt(at)
    expected = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * en
    np.testing.assert_allclose(ddim_step(x, eps, a_t, a_p).numpy(), expected, rtol=1e-12)
    lam, eta = window_coefficients(a_t, a_p, "ddim_eps")
    assert torch.allclose(window_end_from_eps(x, eps, lam, eta), ddim_step(x, eps, a_t, a_p))


def test_diff_eps_eta_is_minus_sqrt_lambda_squared_minus_one():
    a_s, a_e = torch.tensor([0.05, 0.5], dtype=F64), torch.tensor([0.2, 0.9], dtype=F64)
    lam, eta = window_coefficients(a_s, a_e, "diff_eps")
    assert torch.allclose(eta, -(lam**2 - 1).sqrt())


def test_eps_target_makes_the_jump_land_on_the_end_point():
    g = torch.Generator().manual_seed(1)
    x_s, y = torch.randn(4, 2, 3, generator=g, dtype=F64), torch.randn(4, 2, 3, generator=g, dtype=F64)
    table = sd15_alphas_cumprod()
    k = torch.tensor([0, 3, 1, 2])
    for kind in ("diff_eps", "ddim_eps"):
        lam, eta = window_coefficients(*window_abars(table, k, 4), kind)
        eps = eps_target(x_s, y, lam, eta)
        # by hand, per sample: y = lambda x_s + eta eps
        for b in range(4):
            assert torch.allclose(lam[b] * x_s[b] + eta[b] * eps[b], y[b])
        assert torch.allclose(student_target(x_s, y, k, table, 4, kind), eps)


def test_segment_coefficients_predict_the_end_from_any_segment_point():
    g = torch.Generator().manual_seed(2)
    x_s, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    lam = torch.tensor([1.2, 3.0, 1.01, 14.0, 2.0], dtype=F64)
    eta = torch.tensor([-0.6, 0.3, -2.0, -0.1, 0.9], dtype=F64)
    eps = (y - lam[:, None] * x_s) / eta[:, None]
    r = torch.tensor([0.0, 0.25, 0.5, 0.9, 0.37], dtype=F64)
    x_r = (1 - r[:, None]) * x_s + r[:, None] * y
    lam_r, eta_r = segment_coefficients(lam, eta, r)
    assert torch.allclose(lam_r[:, None] * x_r + eta_r[:, None] * eps, y)
    assert torch.allclose(lam_r[0], lam[0]) and torch.allclose(eta_r[0], eta[0])


def test_velocity_target_is_minus_the_core_velocity():
    g = torch.Generator().manual_seed(3)
    x_s, y = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    k = torch.tensor([0, 1, 2, 3])
    t_s, t_e = k.to(F64) / 4, (k + 1).to(F64) / 4
    tau_s, tau_e = tau_from_t(t_s), tau_from_t(t_e)
    v = velocity_target(x_s, y, tau_s, tau_e, 1000)
    assert torch.allclose(v, -segment_velocity(x_s, y, t_s, t_e))
    assert torch.allclose(student_target(x_s, y, k, sd15_alphas_cumprod(), 4, "velocity"), v)
    # (y - x_s) / (t_e - t_s) with PeRFlow's t = tau / T: window 0 is 1 -> 0.75, so v = -4 (y - x_s)
    assert torch.allclose(v[0], -4 * (y[0] - x_s[0]))


def gaussian_eps(abar: torch.Tensor, x: torch.Tensor, s2: float) -> torch.Tensor:
    """Exact eps of data N(0, s2 I): E[eps | x_tau] = sqrt(1 - abar) x / (abar s2 + 1 - abar)."""
    a = abar[:, None]
    return (1 - a).sqrt() * x / (a * s2 + 1 - a)


def test_teacher_score_closed_form_gaussian():
    abar = torch.tensor([0.2, 0.9], dtype=F64)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64, requires_grad=True)
    var = (abar * 4.0 + 1 - abar)[:, None]
    logp = (-0.5 * x**2 / var).sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert torch.allclose(teacher_score(gaussian_eps(abar, x.detach(), 4.0), abar), grad)


def test_vp_marginal_formula():
    z, eps = torch.ones(2, 3, dtype=F64), torch.full((2, 3), 2.0, dtype=F64)
    abar = torch.tensor([0.25, 0.64], dtype=F64)
    out = vp_marginal(z, eps, abar)
    assert torch.allclose(out[0], torch.full((3,), 0.5 + 2 * math.sqrt(0.75), dtype=F64))
    assert torch.allclose(out[1], torch.full((3,), 0.8 + 2 * 0.6, dtype=F64))


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_teacher_window_solve_exact_for_point_mass_data(steps):
    """For data = a point mu, eps(x, i) = (x - sqrt(abar_i) mu) / sqrt(1 - abar_i) and DDIM is exact:
    y = sqrt(abar_e) mu + sqrt(1 - abar_e) eps(x_s), whatever M. The model computes abar from the
    index it is given, so a wrong timestep convention breaks the equality."""
    table = sd15_alphas_cumprod()
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    calls = []

    def eps_model(x, index, scale=1.0):
        calls.append(index.clone())
        a = table[index.round().long()][:, None]
        return scale * (x - a.sqrt() * mu) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(4)
    x_s = torch.randn(4, 3, generator=g, dtype=F64)
    k = torch.tensor([0, 1, 2, 3])
    y = teacher_window_solve(eps_model, x_s, k, table, 4, steps, scale=1.0)
    np_table = numpy_sd15_table()
    a_s = np_table[[999, 749, 499, 249]][:, None]
    a_e = np_table[[749, 499, 249, 0]][:, None]
    e0 = (x_s.numpy() - np.sqrt(a_s) * mu.numpy()) / np.sqrt(1 - a_s)
    np.testing.assert_allclose(y.numpy(), np.sqrt(a_e) * mu.numpy() + np.sqrt(1 - a_e) * e0, rtol=1e-9)
    assert calls[0].tolist() == [999, 749, 499, 249] and len(calls) == steps


def test_teacher_window_solve_converges_to_the_gaussian_flow():
    """Data N(0, s2 I): the PF-ODE maps x_s to x_s sqrt(v_e / v_s), v = abar s2 + 1 - abar."""
    table = sd15_alphas_cumprod()
    s2 = 0.25

    def eps_model(x, index):
        return gaussian_eps(abar_at_index(table, index).to(F64), x, s2)

    x_s = torch.linspace(-2, 2, 6, dtype=F64).reshape(3, 2)
    k = torch.tensor([0, 2, 3])
    a_s, a_e = window_abars(table, k, 4)
    exact = x_s * ((a_e * s2 + 1 - a_e) / (a_s * s2 + 1 - a_s)).sqrt()[:, None]
    errs = [float((teacher_window_solve(eps_model, x_s, k, table, 4, m, discrete=False) - exact).abs().max())
            for m in (8, 64)]
    assert errs[1] < errs[0] / 5 and errs[1] < 2e-2  # first order in 1 / M


def test_configs_validate():
    with pytest.raises(InvalidParameter, match="prediction_type='epsilon'.*diff_eps"):
        EpsWindowConfig(prediction_type="epsilon")
    with pytest.raises(InvalidParameter, match="num_windows=3"):
        EpsWindowConfig(num_windows=3)
    with pytest.raises(InvalidParameter, match="teacher_steps"):
        EpsWindowConfig(teacher_steps=0)
    with pytest.raises(InvalidParameter, match="beta_schedule='cosine'"):
        VPSchedule(beta_schedule="cosine")
    with pytest.raises(InvalidParameter, match="beta_start"):
        VPSchedule(beta_start=0.02, beta_end=0.01)
    cfg = EpsWindowConfig()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_windows = 2  # frozen
