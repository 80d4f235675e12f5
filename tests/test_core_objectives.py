"""DistillationObjective: ``total = L_TM + lambda L_MA`` on the sampler's window batch, MA every
``every``-th step. Both terms are recomputed here directly from ``trajectory_matching_loss`` and
``ma_surrogate`` on the same fixed window batch; the objective's job is only how it combines them."""

from __future__ import annotations

import pytest
import torch

from marflow_core import (
    DistillationObjective,
    MAConfig,
    TimeMLP,
    ma_surrogate,
    trajectory_matching_loss,
)
from marflow_core.trajectory import WindowBatch

F64 = torch.float64
LAMBDA = 0.37


@pytest.fixture
def fixed_batch(gmm2d) -> WindowBatch:
    """32 samples over two windows [0, 0.5), [0.5, 1]: starts from p_{t_k}, ends from p_{t_{k+1}}."""
    gen = torch.Generator().manual_seed(40)
    n = 32
    k = torch.randint(0, 2, (n,), generator=gen)
    t_start, t_end = 0.5 * k.to(F64), 0.5 * k.to(F64) + 0.5
    x_start = torch.where(k[:, None] == 0, gmm2d.sample(n, 0.0, gen), gmm2d.sample(n, 0.5, gen))
    y_end = torch.where(k[:, None] == 0, gmm2d.sample(n, 0.5, gen), gmm2d.sample(n, 1.0, gen))
    t = t_start + 0.5 * torch.rand(n, generator=gen, dtype=F64)
    return WindowBatch(x_start, y_end, k, t, t_start, t_end)


@pytest.fixture
def student() -> TimeMLP:
    torch.manual_seed(3)
    return TimeMLP(2, 16, 2, time_dim=8).double()


def _sampler(wb: WindowBatch):
    def sampler(batch, generator):
        return wb
    return sampler


def _cfg(**kw) -> MAConfig:
    return MAConfig(**{**dict(weight=LAMBDA, substeps=2, solver="euler", divergence="exact"), **kw})


def test_total_is_tm_plus_lambda_ma_with_matching_gradient(gmm2d, fixed_batch, student):
    cfg = _cfg()
    objective = DistillationObjective(_sampler(fixed_batch), gmm2d, cfg)
    terms = objective(student, None, 0, torch.Generator().manual_seed(0))
    tm = trajectory_matching_loss(student, fixed_batch)
    ma = ma_surrogate(student, gmm2d, fixed_batch, cfg)
    tm_value, ma_value = float(tm.detach()), float(ma.detach())
    assert abs(ma_value) > 0.05 and tm_value > 0.1  # both terms matter
    torch.testing.assert_close(terms.total, tm + LAMBDA * ma, rtol=1e-12, atol=1e-12)
    assert set(terms.parts) == {"tm", "ma", "total"}
    assert terms.parts["tm"] == pytest.approx(tm_value, rel=1e-12)
    assert terms.parts["ma"] == pytest.approx(ma_value, rel=1e-12)
    assert terms.parts["total"] == pytest.approx(tm_value + LAMBDA * ma_value, rel=1e-12)
    params = list(student.parameters())
    grad_total = torch.autograd.grad(terms.total, params)
    grad_tm = torch.autograd.grad(tm, params)
    grad_ma = torch.autograd.grad(ma, params)
    for g, g_tm, g_ma in zip(grad_total, grad_tm, grad_ma, strict=True):
        torch.testing.assert_close(g, g_tm + LAMBDA * g_ma, rtol=1e-10, atol=1e-12)
    assert any(float(g.abs().max()) > 1e-3 for g in grad_ma)


def test_ma_term_runs_every_third_step_only(gmm2d, fixed_batch, student):
    cfg = _cfg(every=3)
    objective = DistillationObjective(_sampler(fixed_batch), gmm2d, cfg)
    tm = float(trajectory_matching_loss(student, fixed_batch).detach())
    ma = float(ma_surrogate(student, gmm2d, fixed_batch, cfg).detach())
    for step in range(7):
        terms = objective(student, None, step, torch.Generator().manual_seed(step))
        if step % 3:
            assert set(terms.parts) == {"tm", "total"}, step
            assert float(terms.total.detach()) == pytest.approx(tm, rel=1e-14)
            assert terms.parts["total"] == pytest.approx(tm, rel=1e-14)
        else:
            assert set(terms.parts) == {"tm", "ma", "total"}, step
            assert float(terms.total.detach()) == pytest.approx(tm + LAMBDA * ma, rel=1e-12)


def test_no_ma_term_without_config_or_with_zero_weight(gmm2d, fixed_batch, student):
    tm = float(trajectory_matching_loss(student, fixed_batch).detach())
    for objective in (DistillationObjective(_sampler(fixed_batch)),
                      DistillationObjective(_sampler(fixed_batch), gmm2d, _cfg(weight=0.0))):
        terms = objective(student, None, 0, None)
        assert set(terms.parts) == {"tm", "total"}
        assert float(terms.total.detach()) == pytest.approx(tm, rel=1e-14)
