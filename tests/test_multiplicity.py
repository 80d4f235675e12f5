"""Paired t-tests, Holm's correction and the minimum detectable effect against closed forms and
simulation (``replication/common/testing.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from replication.common.testing import holm, minimum_detectable_effect, paired_test


def test_paired_test_matches_the_t_statistic_by_hand():
    d = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5), se sqrt(0.5), t = 3 / sqrt(0.5) = 4.2426
    out = paired_test(d)
    assert (out.mean, out.n) == (3.0, 5)
    assert out.sd == pytest.approx(math.sqrt(2.5)) and out.stderr == pytest.approx(math.sqrt(0.5))
    # Student t CDF with 4 degrees of freedom in closed form: 1/2 + (3/4) x (1 - x^2 / 3),
    # x = t / sqrt(4 + t^2); two-sided p for t = 4.2426 is 0.01324
    t = 3 / math.sqrt(0.5)
    x = t / math.sqrt(4 + t * t)
    cdf_4df = 0.5 + 0.75 * x * (1 - x * x / 3)
    assert out.p_value == pytest.approx(2 * (1 - cdf_4df), rel=1e-9)
    with pytest.raises(ValueError, match=">= 2 seeds"):
        paired_test([1.0])


def test_holm_on_a_worked_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([0.02, 0.8]) == pytest.approx([0.04, 0.8])
    assert holm([]) == []


def test_holm_controls_the_family_wise_error_under_the_null():
    """20 true nulls, uniform p-values: P(any adjusted p <= 0.05) <= 0.05 (Bonferroni-like bound)."""
    rng = np.random.default_rng(0)
    trials = 4000
    hits = sum(min(holm(list(rng.uniform(size=20)))) <= 0.05 for _ in range(trials))
    assert hits / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_the_mde_is_detected_with_the_stated_power():
    """Simulated paired experiments with true effect = MDE: rejection rate ~ power (within MC error
    and the approximation's few percent)."""
    rng = np.random.default_rng(1)
    sd, n, alpha = 2.0, 6, 0.05
    mde = minimum_detectable_effect(sd, n, alpha, 0.8)
    trials = 4000
    rejected = sum(paired_test(list(rng.normal(mde, sd, size=n))).p_value <= alpha for _ in range(trials))
    assert abs(rejected / trials - 0.8) < 0.04
    assert minimum_detectable_effect(sd, 1) == math.inf
    assert minimum_detectable_effect(sd, 20) < mde  # more seeds, smaller detectable effect
