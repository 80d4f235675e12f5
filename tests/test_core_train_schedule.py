"""What ``train`` hands the optimizer: the warm-up learning rate and the clipped gradient.

``torch.optim.Adam`` is replaced by a subclass whose ``step`` records, at the moment of the step,
each param group's ``lr``, the parameters and the total gradient norm. The objective is a quadratic
``scale / 2 |w - target|^2`` of one parameter tensor, so the raw gradient ``scale (w - target)`` is
known in closed form from the recorded parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marflow_core import LossTerms, TrainConfig, train

F64 = torch.float64
TARGET = torch.tensor([0.5, -1.0, 2.0], dtype=F64)


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 1.0, -2.0], dtype=F64))


def quadratic_objective(scale: float):
    def objective(model, batch, step, generator):
        total = 0.5 * scale * (model.w - TARGET).pow(2).sum()
        return LossTerms(total, {"loss": float(total.detach())})
    return objective


@pytest.fixture
def records(monkeypatch):
    """``[(lrs, w, grad_norm)]`` per optimizer step, recorded by a patched ``torch.optim.Adam``."""
    seen: list[tuple[list[float], torch.Tensor, float]] = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
            seen.append(([group["lr"] for group in self.param_groups], params[0].detach().clone(), norm))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    return seen


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=8, lr=0.01, checkpoint_every=100, log_every=100,
                                 warmup=0, grad_clip=1.0), **kw})


@pytest.mark.parametrize("warmup", [1, 3, 5, 20])
def test_warmup_learning_rate_at_each_step(records, warmup):
    """lr_s = lr min(1, (s + 1) / warmup) for step s = 0, 1, ..."""
    train(Quadratic(), quadratic_objective(1e-3), lambda s, g: None, _config(warmup=warmup), progress=False)
    assert len(records) == 8
    for s, (lrs, _, _) in enumerate(records):
        assert lrs == [pytest.approx(0.01 * min(1.0, (s + 1) / warmup), rel=1e-15)], (s, lrs)
    if warmup > 1:
        assert records[0][0][0] < 0.01  # warm-up is visible


def test_no_warmup_keeps_the_learning_rate(records):
    train(Quadratic(), quadratic_objective(1e-3), lambda s, g: None, _config(warmup=0), progress=False)
    assert [lrs for lrs, _, _ in records] == [[0.01]] * 8


def test_huge_gradient_arrives_clipped_to_grad_clip(records):
    scale, clip = 1e6, 0.75
    train(Quadratic(), quadratic_objective(scale), lambda s, g: None, _config(grad_clip=clip), progress=False)
    assert len(records) == 8
    for _, w, norm in records:
        raw = scale * float((w - TARGET).norm())
        assert raw > 1e5  # the raw gradient is huge ...
        assert norm == pytest.approx(clip, rel=1e-9)  # ... and the optimizer sees it clipped


def test_small_gradient_is_not_clipped(records):
    scale = 1e-3
    train(Quadratic(), quadratic_objective(scale), lambda s, g: None, _config(grad_clip=1.0), progress=False)
    for _, w, norm in records:
        assert norm == pytest.approx(scale * float((w - TARGET).norm()), rel=1e-12)
        assert norm < 0.01


@pytest.mark.parametrize("grad_clip", [0.0, -1.0])
def test_non_positive_grad_clip_disables_clipping(records, grad_clip):
    scale = 1e6
    train(Quadratic(), quadratic_objective(scale), lambda s, g: None, _config(grad_clip=grad_clip),
          progress=False)
    assert len(records) == 8
    for _, w, norm in records:
        assert norm == pytest.approx(scale * float((w - TARGET).norm()), rel=1e-12)
        assert norm > 1e5
