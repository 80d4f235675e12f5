"""Paired tests over training seeds, corrected for their number, and the effect each could detect.

A comparison of two methods (``treated - control``, paired by training seed) over a family of
``m`` metrics x NFE cells is a family of ``m`` tests. Reported here, per cell:

* ``paired_test``: the mean difference, its standard error ``sd / sqrt(n)`` and the two-sided
  one-sample t-test p-value against 0 (``n - 1`` degrees of freedom);
* ``holm``: Holm's step-down adjusted p-values (Holm 1979), which control the family-wise error
  rate at ``alpha`` under any dependence between the tests: sort ``p_(1) <= ... <= p_(m)``, set
  ``q_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; a test is rejected when ``q <= alpha``;
* ``minimum_detectable_effect``: the smallest true mean difference a paired t-test at level
  ``alpha`` (two-sided) detects with probability ``power``, for ``n`` seeds with between-seed
  standard deviation ``sd``: ``(t_{1 - alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)`` (the usual
  normal-approximation formula with t quantiles; exact for the non-central t to within a few
  percent at n >= 5). Under Holm, the first test is made at ``alpha / m``: that is the level the
  MDE of a family is quoted at, the most demanding one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedTest:
    """``treated - control`` over ``n`` paired seeds: mean, standard error, sd and p-value."""

    mean: float
    stderr: float
    sd: float
    n: int
    p_value: float


def paired_test(differences: Sequence[float]) -> PairedTest:
    """One-sample two-sided t-test of paired ``differences`` (n >= 2) against 0."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        raise ValueError(f"a paired test needs >= 2 seeds, got {n}")
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    stderr = sd / math.sqrt(n)
    if stderr == 0.0:
        p = 0.0 if mean != 0.0 else 1.0
    else:
        p = float(2 * stats.t.sf(abs(mean / stderr), n - 1))
    return PairedTest(mean, stderr, sd, n, p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order (each in [0, 1], monotone in the raw order)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean difference a two-sided paired t-test at ``alpha`` detects with ``power``."""
    from scipy import stats

    if n < 2:
        return math.inf
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))
