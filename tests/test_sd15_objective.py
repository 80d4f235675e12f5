"""The SD 1.5 loss pieces against closed forms, with linear stand-in eps-models ``eps(x) = c x``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from marflow_core.marginal import MAConfig
from replication.sd15 import vp
from replication.sd15.config import PeRFlowSD15Config
from replication.sd15.objective import (
    PeRFlowSD15Objective,
    StudentVelocity,
    TextConditioning,
    conditioning,
    draw_sample_noise,
)

ALPHAS = vp.sd15_alphas_cumprod()


class LinearEps:
    """``eps(x, t, text) = c x``: every Jacobian is known."""

    def __init__(self, c: float) -> None:
        self.c = c

    def __call__(self, x, timestep, text):
        return SimpleNamespace(sample=self.c * x)


def _cond(b: int) -> TextConditioning:
    text = torch.zeros(b, 3, 2, dtype=torch.float64)
    return TextConditioning(text, text, text, 1.0)


@pytest.mark.parametrize("target", ["diff_eps", "ddim_eps"])
def test_one_euler_substep_is_the_window_jump(target):
    """From the window start, one Euler step of the student velocity lands on lambda x_s + eta eps."""
    k = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    field = StudentVelocity(LinearEps(0.7), _cond(4).student, k, ALPHAS, 4, target)
    tau_s, tau_e = vp.window_bounds_tau(k, 4)
    t_s, t_e = vp.t_from_tau(tau_s), vp.t_from_tau(tau_e)
    y = x + (t_e - t_s).reshape(-1, 1, 1, 1) * field(x, t_s)
    lam, eta = vp.window_coefficients(*vp.window_abars(ALPHAS, k, 4), target)
    assert torch.allclose(y, vp.window_end_from_eps(x, 0.7 * x, lam, eta), atol=1e-10)


@pytest.mark.parametrize("divergence", ["hutchinson_fd", "hutchinson"])
@pytest.mark.parametrize("target", ["diff_eps", "velocity"])
def test_ma_term_matches_closed_form_for_a_linear_student(divergence, target):
    """eps = c x gives v = a x, so div v = a d exactly for any probe; with one sub-step
    logdet = h a d, y = (1 + h a) x_s and s_T(y) = -c_T y / sqrt(1 - abar_e)."""
    b, shape = 3, (2, 3, 3)
    d = 18
    k = torch.tensor([0, 2, 3])
    x_s = torch.randn(b, *shape, dtype=torch.float64)
    ma = MAConfig(weight=1.0, substeps=1, divergence=divergence, n_probes=2,
                  **({"fd_step": 1e-3} if divergence == "hutchinson_fd" else {}))
    c_s, c_t = 0.4, 0.9
    obj = PeRFlowSD15Objective(LinearEps(c_t), ALPHAS, PeRFlowSD15Config(target=target), 4, ma,
                               ma_fd_fp32=False)
    probes = torch.randint(0, 2, (2, b, *shape)).double() * 2 - 1  # Rademacher: e^T (a I) e = a d exactly
    got = obj.ma_term(LinearEps(c_s), x_s, k, _cond(b), probes)
    tau_s, tau_e = vp.window_bounds_tau(k, 4)
    h = vp.t_from_tau(tau_e) - vp.t_from_tau(tau_s)
    if target == "velocity":
        a = -c_s * torch.ones(b, dtype=torch.float64)
    else:
        lam, eta = vp.window_coefficients(*vp.window_abars(ALPHAS, k, 4), target)
        a = (lam + eta * c_s - 1) / h
    y = (1 + h * a).reshape(-1, 1, 1, 1) * x_s
    score = -c_t * y / (1 - vp.abar_at(ALPHAS, tau_e)).sqrt().reshape(-1, 1, 1, 1)
    expected = (-(h * a * d) - (score * y).flatten(1).sum(-1)).mean() / d
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_ma_window_weights_and_normalisation():
    b, k = 2, torch.tensor([1, 3])
    x_s = torch.randn(b, 2, 3, 3, dtype=torch.float64)
    probes = torch.ones(1, b, 2, 3, 3, dtype=torch.float64)

    def term(**kw):
        ma = MAConfig(substeps=1, divergence="hutchinson_fd", fd_step=1e-2, **kw)
        return float(PeRFlowSD15Objective(LinearEps(0.5), ALPHAS, PeRFlowSD15Config(), 4, ma,
                                          ma_fd_fp32=False)
                     .ma_term(LinearEps(0.3), x_s, k, _cond(b), probes))

    assert term(normalize_by_dim=False) == pytest.approx(18 * term())
    per = [term(window_weights=[0, 1, 0, 0]), term(window_weights=[0, 0, 0, 1])]
    assert sum(per) == pytest.approx(term(window_weights=[1, 1, 1, 1]))
    assert per[0] != pytest.approx(per[1])


def test_cfg_sync_and_baked_guidance():
    text, null = torch.ones(3, 2, 4), torch.zeros(3, 2, 4)
    keep = torch.tensor([True, False, True])
    sync = conditioning(text, null, keep, PeRFlowSD15Config(guidance="sync"))
    assert torch.equal(sync.student[1], null[1]) and torch.equal(sync.student[0], text[0])
    assert torch.equal(sync.teacher, sync.student) and sync.teacher_guidance == 1.0
    baked = conditioning(text, null, keep, PeRFlowSD15Config(guidance="baked", teacher_guidance=6.0))
    assert torch.equal(baked.student, sync.student) and torch.equal(baked.teacher, text)
    assert baked.teacher_guidance == 6.0


def test_per_sample_draws_do_not_depend_on_the_batch_split():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]  # noqa: E731
    whole = draw_sample_noise(gens(), (2, 3, 3), 0.3, 2, "rademacher")
    g = gens()
    halves = [draw_sample_noise(g[:2], (2, 3, 3), 0.3, 2, "rademacher"),
              draw_sample_noise(g[2:], (2, 3, 3), 0.3, 2, "rademacher")]
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert torch.equal(whole.probes, torch.cat([h.probes for h in halves], 1))
    assert torch.equal(whole.u, torch.cat([h.u for h in halves]))


def test_window_sample_start_and_target():
    """x_s is the VP marginal at the window start; the eps target makes the jump land on y_T."""
    obj = PeRFlowSD15Objective(lambda x, t, c: SimpleNamespace(sample=0.2 * x), ALPHAS,
                               PeRFlowSD15Config(teacher_steps=3), 4, None)
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    noise = SimpleNamespace(u=torch.tensor([0.0, 0.3, 0.6, 0.999]), noise=torch.randn_like(z))
    tau, k, x_s, y = obj.window_sample(z, noise, _cond(4))
    assert k.tolist() == [0, 1, 2, 3] and tau.tolist() == pytest.approx([1000.0, 700.0, 400.0, 1.0])
    tau_s, _ = vp.window_bounds_tau(k, 4)
    assert torch.allclose(x_s, vp.vp_marginal(z, noise.noise, vp.abar_at(ALPHAS, tau_s)))
    eps = vp.student_target(x_s, y, k, ALPHAS, 4, "diff_eps")
    lam, eta = vp.window_coefficients(*vp.window_abars(ALPHAS, k, 4), "diff_eps")
    assert torch.allclose(vp.window_end_from_eps(x_s, eps, lam, eta), y)
