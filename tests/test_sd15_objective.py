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


def _sd_ma_loop(obj, unet, x_s, k, cond, probes, ma):
    """The MA term as the SD tier computed it before it called the core: Euler sub-steps in SD's own
    loop, float32 log-det, float64 times (a reference for ``ma_term``)."""
    from marflow_core.divergence import finite_difference_divergence, hutchinson_divergence
    from replication.sd15.objective import StudentVelocity

    x, field = x_s.detach(), StudentVelocity(unet, cond.student, k, ALPHAS, 4, obj.perflow.target)
    tau_s, tau_e = vp.window_bounds_tau(k, 4)
    t_s, t_e = vp.t_from_tau(tau_s), vp.t_from_tau(tau_e)
    logdet = torch.zeros(x.shape[0], dtype=torch.float32)
    for i in range(ma.substeps):
        t, h = t_s + (t_e - t_s) * i / ma.substeps, (t_e - t_s) / ma.substeps
        if ma.divergence == "hutchinson_fd":
            v, div = finite_difference_divergence(field, x, t, probes, ma.fd_step, create_graph=True)
        else:
            v, div = hutchinson_divergence(field, x, t, probes, create_graph=True)
        logdet = logdet + h.float() * div.float()
        x = x + h.reshape(-1, 1, 1, 1).to(x.dtype) * v
    index = vp.table_index(tau_e).clamp(min=0)
    score = vp.teacher_score(obj.teacher_eps(cond)(x.detach(), index), vp.abar_at(ALPHAS, tau_e))
    return (-logdet - (score.float() * x.float()).flatten(1).sum(-1)).mean() / x[0].numel()


class TanhEps:
    """A nonlinear stand-in: ``eps(x) = tanh(c x) + 0.1 x^2`` (its divergence varies along the path)."""

    def __init__(self, c: float) -> None:
        self.c = c

    def __call__(self, x, timestep, text):
        return SimpleNamespace(sample=torch.tanh(self.c * x) + 0.1 * x * x)


@pytest.mark.parametrize("divergence", ["hutchinson_fd", "hutchinson"])
@pytest.mark.parametrize("target", ["diff_eps", "velocity"])
def test_ma_term_through_the_core_is_the_sd_loop(divergence, target):
    """``ma_term`` (the core's ``ma_surrogate`` through the adapters) computes what the SD tier's own
    sub-step loop computed, for a nonlinear student over 3 sub-steps."""
    b, shape = 4, (2, 3, 3)
    k = torch.tensor([0, 1, 2, 3])
    gen = torch.Generator().manual_seed(0)
    x_s = torch.randn(b, *shape, dtype=torch.float64, generator=gen)
    probes = torch.randn(2, b, *shape, dtype=torch.float64, generator=gen)
    ma = MAConfig(weight=1.0, substeps=3, divergence=divergence, n_probes=2,
                  **({"fd_step": 1e-3} if divergence == "hutchinson_fd" else {}))
    obj = PeRFlowSD15Objective(TanhEps(0.8), ALPHAS, PeRFlowSD15Config(target=target), 4, ma,
                               ma_fd_fp32=False)
    got = obj.ma_term(TanhEps(0.5), x_s, k, _cond(b), probes)
    want = _sd_ma_loop(obj, TanhEps(0.5), x_s, k, _cond(b), probes, ma)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6, abs=1e-9)


def test_ma_term_keeps_a_float32_state_under_float16_latents():
    """fp16 latents (mixed precision without ``ma_fd_fp32``): the UNet sees fp16, the path, log-det
    and score product stay float32, close to the float64 value."""
    b, shape = 3, (2, 3, 3)
    k = torch.tensor([0, 2, 3])
    gen = torch.Generator().manual_seed(1)
    x_s = torch.randn(b, *shape, generator=gen)
    probes = (torch.randint(0, 2, (1, b, *shape), generator=gen) * 2 - 1).float()
    seen = []

    class Recording(LinearEps):
        def __call__(self, x, timestep, text):
            seen.append(x.dtype)
            return super().__call__(x, timestep, text)

    ma = MAConfig(weight=1.0, substeps=2, divergence="hutchinson", n_probes=1)
    obj = PeRFlowSD15Objective(LinearEps(0.9), ALPHAS, PeRFlowSD15Config(), 4, ma, ma_fd_fp32=False)
    half = obj.ma_term(Recording(0.4), x_s.half(), k, _cond(b), probes)
    full = obj.ma_term(LinearEps(0.4), x_s.double(), k, _cond(b), probes)
    assert half.dtype == torch.float32 and set(seen) == {torch.float16}
    assert float(half) == pytest.approx(float(full), rel=1e-2)
    fp32 = PeRFlowSD15Objective(LinearEps(0.9), ALPHAS, PeRFlowSD15Config(), 4,
                                MAConfig(substeps=1, divergence="hutchinson_fd", fd_step=1e-2), ma_fd_fp32=True)
    seen.clear()
    assert fp32.ma_term(Recording(0.4), x_s.half(), k, _cond(b), probes).dtype == torch.float32
    assert set(seen) == {torch.float32}  # ma_fd_fp32: the finite-difference passes get float32


def test_given_probes_replace_the_generator_draw_in_the_core():
    """``ma_surrogate(probes=...)`` with the probes a generator would draw is bit-identical to drawing
    them; with ``batch_fraction`` the probes of the kept rows are used."""
    from marflow_core import (
        GaussianMixtureTeacher,
        VelocityTeacher,
        WindowBatch,
        ma_surrogate,
        sample_probes,
    )

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=gen)
    t0, t1 = torch.full((6,), 0.25), torch.full((6,), 0.5)
    wb = WindowBatch(x, x, torch.ones(6, dtype=torch.long), t0, t0, t1)
    teacher = GaussianMixtureTeacher([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3])
    student = VelocityTeacher(lambda z, t: torch.sin(z) * (1 + t[:, None])).velocity
    for kind in ("hutchinson", "hutchinson_fd"):
        cfg = MAConfig(divergence=kind, n_probes=3, probe_kind="gaussian", substeps=2)
        drawn = ma_surrogate(student, teacher, wb, cfg, torch.Generator().manual_seed(5))
        probes = sample_probes(x, 3, "gaussian", torch.Generator().manual_seed(5))
        assert torch.equal(ma_surrogate(student, teacher, wb, cfg, probes=probes), drawn)
        half = MAConfig(divergence=kind, n_probes=3, probe_kind="gaussian", substeps=2, batch_fraction=0.5)
        assert torch.equal(ma_surrogate(student, teacher, wb, half, probes=probes),
                           ma_surrogate(student, teacher, wb.head(3), cfg, probes=probes[:, :3]))


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
