"""The 2-D tier's analyses (TV bound, under-determination) against closed forms.

With a one-component teacher ``x1 ~ N(mu, sigma^2 I)`` the teacher ODE map is ``T(x) = mu + sigma x``
and every marginal is Gaussian, so the analytic construction has exact answers in 2-D: the matching
error of ``T(R x0)`` is ``sigma^2 E|R x0 - x0|^2 = 4 sigma^2 (1 - cos theta)``, its KL is 0, and the
shifted student ``T(x0) + c`` with ``|c|^2`` equal to that error has KL ``|c|^2 / (2 sigma^2) =
2 (1 - cos theta)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marflow_core import GaussianMixtureTeacher, TimeWindows
from replication.common.stats import Estimate, paired_difference
from replication.common.students import StudentSpec
from replication.toy2d.config import TVBoundConfig
from replication.toy2d.tier import TrainedStudent
from replication.toy2d.tv_bound import BoundCheck, pinsker_sum, tv_bound
from replication.toy2d.underdetermination import (
    ROTATED,
    SHIFTED,
    TEACHER,
    SnapshotScore,
    analytic_construction,
    closest_tm_pair,
)

F64 = torch.float64


def whitened(n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


@pytest.mark.parametrize("degrees", [10.0, 90.0])
def test_analytic_construction_one_gaussian_closed_form(degrees):
    mu, sigma = [1.0, -2.0], 0.5
    teacher = GaussianMixtureTeacher([1.0], [mu], [sigma], dtype=F64)
    x0 = whitened(4000, seed=0)
    result = analytic_construction(teacher, x0, degrees, teacher_steps=32)
    c = 1 - math.cos(math.radians(degrees))
    t, r, s = (result.by_name(n) for n in (TEACHER, ROTATED, SHIFTED))
    torch.testing.assert_close(t.samples, torch.tensor(mu, dtype=F64) + sigma * x0, rtol=1e-6, atol=1e-6)
    assert t.matching_error == 0.0
    assert r.matching_error == pytest.approx(4 * sigma**2 * c, rel=1e-5)
    assert s.matching_error == pytest.approx(r.matching_error, rel=1e-12)
    assert math.hypot(*result.shift) ** 2 == pytest.approx(r.matching_error, rel=1e-12)
    assert abs(t.kl.value) < 1e-6 and abs(r.kl.value) < 1e-6  # both push N(0, I) onto p_1 exactly
    assert s.kl.value == pytest.approx(2 * c, rel=1e-5)
    # TV of two equal-variance Gaussians: 2 Phi(|c| / (2 sigma)) - 1, within Monte-Carlo error
    tv = 2 * 0.5 * (1 + math.erf(math.sqrt(r.matching_error) / (2 * sigma) / math.sqrt(2))) - 1
    assert abs(s.tv.value - tv) < 5 * s.tv.stderr


def _score(name: str, step: int, tm: torch.Tensor, kl: float, method: str = "perflow") -> SnapshotScore:
    return SnapshotScore(name, method, 4, step, Estimate(float(tm.mean()), 0.0), Estimate(kl, 0.01), 0.0, tm)


def test_paired_difference_is_the_standard_error_of_the_differences():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=gen, dtype=F64)
    b = a + 0.01 * torch.randn(1000, generator=gen, dtype=F64)
    d = paired_difference(a, b)
    diffs = (a - b).numpy()
    assert d.value == pytest.approx(diffs.mean(), rel=1e-12)
    assert d.stderr == pytest.approx(diffs.std(ddof=1) / math.sqrt(1000), rel=1e-12)
    with pytest.raises(ValueError):
        paired_difference(a, b[:10])


def test_closest_pair_uses_the_paired_standard_error():
    """Losses that share their per-sample difficulty: a mean gap of 0.001 is far below the unpaired
    error (~0.009) but 10 paired standard errors, so that pair is *not* statistically equal."""
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(4000, generator=gen, dtype=F64)  # per-sample difficulty, shared
    noise = lambda: 1e-4 * torch.randn(4000, generator=gen, dtype=F64)  # noqa: E731
    distinct = _score("perflow", 100, base + noise(), kl=1.0)
    shifted = _score("perflow_ma", 100, base + 0.001 + noise(), kl=9.0)  # 10 paired SE away
    equal = _score("perflow_ma", 200, base + noise(), kl=3.0)  # statistically equal to `distinct`
    other_method = _score("reflow", 100, base + noise(), kl=50.0, method="reflow")
    best = closest_tm_pair([distinct, shifted, equal, other_method], within_se=2.0)
    assert best is not None and {best.a.kl.value, best.b.kl.value} == {1.0, 3.0}
    assert best.kl_ratio == pytest.approx(3.0)
    assert best.tm_gap_in_se <= 2.0
    unpaired_se = math.hypot(distinct.tm_per_sample.std() / 63.2, shifted.tm_per_sample.std() / 63.2)
    assert abs(distinct.tm.value - shifted.tm.value) < float(unpaired_se)  # unpaired would accept it
    assert closest_tm_pair([distinct, shifted], within_se=2.0) is None


def test_bound_check_and_pinsker_sum():
    assert BoundCheck("x", 1.0, 0.9, 0.11).holds and not BoundCheck("x", 1.0, 0.9, 0.09).holds
    total = pinsker_sum([Estimate(0.02, 0.0), Estimate(0.08, 0.0), Estimate(-0.01, 0.0)])
    assert total.value == pytest.approx(math.sqrt(0.01) + math.sqrt(0.04)) and total.stderr == 0.0
    # a KL of 0.08 +- 0.0 and 0.02 +- 0.01: the error of sqrt(KL/2) over one SE up, in quadrature
    one = pinsker_sum([Estimate(0.02, 0.01), Estimate(0.08, 0.0)])
    assert one.stderr == pytest.approx(math.sqrt(0.03 / 2) - math.sqrt(0.01))
    # small relative errors: the delta method, d sqrt(K/2) = dK / (2 sqrt(2K))
    small = pinsker_sum([Estimate(0.5, 1e-6), Estimate(0.18, 2e-6)])
    expected = math.hypot(1e-6 / (2 * math.sqrt(1.0)), 2e-6 / (2 * math.sqrt(0.36)))
    assert small.stderr == pytest.approx(expected, rel=1e-4)


class AffineStudent(nn.Module):
    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, t):
        return self.a * x + self.b


def test_tv_bound_terms_of_a_one_window_affine_student():
    """K = 1 from p_0 = N(0, I): the window map is the whole sampler, so the final TV equals the
    local TV (independent samples: within MC error); R_1 (estimator A) and the fine Euler map's KL
    equal the closed-form KL of the affine ODE's pushforward N(b (e^a - 1)/a, e^{2a} I)."""
    mu, sigma, a, b = [0.8, -0.4], 0.7, -0.2, 0.3
    teacher = GaussianMixtureTeacher([1.0], [mu], [sigma], dtype=F64)
    student = TrainedStudent("affine", StudentSpec("perflow", windows=1), AffineStudent(a, b),
                             TimeWindows(1), [])
    cfg = TVBoundConfig(steps_per_window=1, ode_substeps=32, ode_euler_steps=256, n_samples=20000)
    bound = tv_bound(student, teacher, cfg, seed=3)
    (w,) = bound.windows
    assert (w.window, w.t_start, w.t_end) == (0, 0.0, 1.0)
    assert abs(bound.final_tv.value - w.local_tv.value) < 4 * math.hypot(bound.final_tv.stderr,
                                                                         w.local_tv.stderr)
    assert bound.sum_local_tv.value == w.local_tv.value
    g = math.exp(a)
    mean, var = b * (g - 1) / a, g * g
    kl = 0.5 * (2 * var / sigma**2 + sum((mean - m) ** 2 for m in mu) / sigma**2 - 2
                + 2 * math.log(sigma**2 / var))
    assert abs(w.r_k.value - kl) < 5 * w.r_k.stderr + 1e-4
    assert abs(w.ode_local_kl.value - kl) < 5 * w.ode_local_kl.stderr + 0.01  # Euler error O(1/256)
    assert bound.pinsker_estimator_a.value == pytest.approx(math.sqrt(w.r_k.value / 2))
    assert all(c.holds for c in bound.checks)
