"""Evaluation helpers of the image tier: samplers with counted network calls, seed intervals, figures.

Every sampler of one table starts from the same noise (common random numbers), so differences
between methods are not differences of noise draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from marflow_core import TimeWindows, odeint_adaptive, sample_few_step
from marflow_core.models import VelocityField


class CountingField(torch.nn.Module):
    """Wraps a velocity field and counts its calls (function evaluations, NFE)."""

    def __init__(self, field: VelocityField) -> None:
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.field(x, t)


@torch.no_grad()
def adaptive_teacher_samples(teacher: VelocityField, x0: torch.Tensor, method: str, rtol: float,
                             atol: float, batch: int = 512) -> tuple[torch.Tensor, float]:
    """The teacher ODE from ``x0: (B, ...)`` at ``t = 0`` to ``t = 1`` by an adaptive solver, in
    chunks of ``batch``; returns the samples and the mean NFE per chunk."""
    counter = CountingField(teacher)
    chunks = [odeint_adaptive(counter, x0[i:i + batch], (0.0, 1.0), method, rtol, atol)
              for i in range(0, len(x0), batch)]
    return torch.cat(chunks), counter.calls / max(1, math.ceil(len(x0) / batch))


@torch.no_grad()
def few_step_samples(model: VelocityField, windows: TimeWindows, nfe: int, x0: torch.Tensor,
                     batch: int = 512) -> torch.Tensor:
    """The student's ``nfe``-step Euler sampler (steps spread over its windows) from ``x0``."""
    return torch.cat([sample_few_step(model, x0[i:i + batch], windows, nfe)
                      for i in range(0, len(x0), batch)])


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    tic = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - tic


def loss_frame(histories: dict[str, list[dict[str, float]]], parts: Sequence[str]):
    """Long-format frame (run, step, term, value) of logged loss ``parts``."""
    import pandas as pd

    rows = [{"run": name, "step": record["step"], "term": part, "value": record[part]}
            for name, history in histories.items() for record in history
            for part in parts if part in record]
    return pd.DataFrame(rows)


def convergence(history: list[dict[str, float]], key: str = "heldout_tm", tail: float = 1 / 3) -> dict:
    """Has ``key`` plateaued? Its last logged value, its minimum, and its relative change over the last
    ``tail`` of training: ``(mean over the last half of the tail - mean over the first half) / first``
    (0 for a plateau; negative: still falling); NaN (not measurable) with fewer than 4 logged values
    of ``key`` in the tail (a tiny profile)."""
    values = [(r["step"], r[key]) for r in history if key in r]
    if not values:
        raise ValueError(f"no {key!r} in the history: was the run trained with a held-out scorer?")
    last_step = values[-1][0]
    in_tail = [v for step, v in values if step > last_step * (1 - tail)]
    change = float("nan")
    if len(in_tail) >= 4:
        half = len(in_tail) // 2
        first, second = sum(in_tail[:half]) / half, sum(in_tail[half:]) / (len(in_tail) - half)
        change = (second - first) / first
    return {f"{key}_final": values[-1][1], f"{key}_min": min(v for _, v in values),
            f"{key}_tail_change": change}


def image_grid(rows: dict[str, torch.Tensor], ncols: int = 8, cell: float = 0.55):
    """A figure with one labelled row of images per entry; images ``(N, C, H, W)`` in ``[-1, 1]``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * cell + 1.8, len(rows) * cell + 0.2),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        images = ((images[:ncols].detach().cpu().float().clamp(-1, 1) + 1) / 2)
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                img = images[c].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return fig
