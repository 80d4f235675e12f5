"""The statistics every tier reports with: Monte-Carlo estimates, seed intervals, paired deltas.

* ``Estimate`` / ``mc_mean``: a mean of i.i.d. samples and its standard error ``std / sqrt(n)``;
  ``paired_difference``: the same for ``a - b`` scored on one sample (common random numbers).
* ``Interval`` / ``seed_interval``: a mean over training seeds with a two-sided Student-t interval;
  ``paired_delta``: ``treated - control`` paired by seed.
* ``standard_normal_log_prob``: ``log N(x; 0, I)``, the base density of every flow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Estimate:
    """A Monte-Carlo mean and its standard error."""

    value: float
    stderr: float

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.stderr:.4f}"


def mc_mean(samples: torch.Tensor) -> Estimate:
    """Mean of i.i.d. ``samples`` and its standard error ``std / sqrt(n)``."""
    n = samples.numel()
    return Estimate(float(samples.mean()), float(samples.std() / math.sqrt(n)) if n > 1 else math.nan)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> Estimate:
    """``mean(a - b)`` with its paired standard error: ``a[i]`` and ``b[i]`` are scored on one sample."""
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs equal shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    return mc_mean(a - b)


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """``(B,)``: ``log N(x; 0, I)`` for ``x: (B, ...)``."""
    d = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its two-sided ``level`` Student-t interval
    (``t_{(1+level)/2, n-1} * sd / sqrt(n)``; NaN for ``n = 1``)."""

    mean: float
    half_width: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3g} (1 seed)"
        return f"{self.mean:.3g} ± {self.half_width:.2g}"


def seed_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean over training seeds with a Student-t confidence interval."""
    from scipy import stats

    x = torch.as_tensor(list(values), dtype=torch.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    if n == 1:
        return Interval(float(x[0]), float("nan"), 1)
    sd = float(x.std(unbiased=True))
    return Interval(float(x.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n)


def paired_delta(treated: dict[int, float], control: dict[int, float], level: float = 0.95) -> Interval:
    """``treated - control`` paired by training seed (the seeds both have), with its t interval."""
    seeds = sorted(set(treated) & set(control))
    if not seeds:
        raise ValueError(f"no common seeds: {sorted(treated)} vs {sorted(control)}")
    return seed_interval([treated[s] - control[s] for s in seeds], level)
