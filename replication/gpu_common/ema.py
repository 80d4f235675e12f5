"""An exponential moving average of a model's weights, with Rectified Flow's warm-up.

After update ``n`` (``n = 1, 2, ...``) of weights ``theta_n``:

    ema_n = d_n ema_{n-1} + (1 - d_n) theta_n,   ema_0 = theta_0,
    d_n = min(decay, (1 + n) / (10 + n))          (``warmup``; else d_n = decay).

This is the rule of Rectified Flow's CIFAR-10 code (``gnobitab/RectifiedFlow``,
``ImageGeneration/models/ema.py``, ``ExponentialMovingAverage`` with ``use_num_updates=True``, the
default its ``run_lib.py`` and ``run_lib_reflow.py`` construct), not diffusers' ``EMAModel``, whose
warm-up is shifted by one update and copies the weights at the first. With the warm-up the cap
``decay`` binds only from ``n = (10 decay - 1) / (1 - decay)`` on (about 9e6 updates at 0.999999,
9e4 at 0.9999): before, the average weighs update ``k`` in proportion to about ``(k + 10)^8``
(``(1 - d_k) prod_{j > k} d_j``; a mean age of a tenth of the run).

The interface is the one the accelerate trainer (``accelerate_train``) uses for diffusers' EMA too:
``step``, ``copy_to``, ``store`` / ``restore``, ``to``, ``state_dict`` / ``load_state_dict`` (so
accelerate's ``register_for_checkpointing`` saves and reloads it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class WeightEMA:
    """EMA of ``parameters`` (their current values are ``ema_0``), see the module docstring."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow_params = [p.detach().clone() for p in parameters]
        self._stored: list[torch.Tensor] | None = None

    def current_decay(self, n: int) -> float:
        """``d_n`` of update ``n`` (1-based)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One update with the current ``parameters`` (same order and shapes as at construction)."""
        params = list(parameters)
        if len(params) != len(self.shadow_params):
            raise ValueError(f"ema holds {len(self.shadow_params)} tensors, got {len(params)} parameters")
        self.num_updates += 1
        d = self.current_decay(self.num_updates)
        for shadow, p in zip(self.shadow_params, params, strict=True):
            shadow.mul_(d).add_(p.detach().to(shadow.dtype), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averages into ``parameters``."""
        for shadow, p in zip(self.shadow_params, list(parameters), strict=True):
            p.copy_(shadow.to(p.device, p.dtype))

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep a copy of ``parameters`` for ``restore``."""
        self._stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Put back the values saved by ``store``."""
        if self._stored is None:
            raise RuntimeError("restore() without a store()")
        for saved, p in zip(self._stored, list(parameters), strict=True):
            p.copy_(saved)
        self._stored = None

    @contextmanager
    def averaged(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """Inside, ``parameters`` hold the averages; their own values come back after."""
        params = list(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightEMA:
        self.shadow_params = [s.to(device=device, dtype=dtype) for s in self.shadow_params]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict``; the averages keep this EMA's devices (accelerate hands them over on
        the CPU)."""
        shadows = list(state["shadow_params"])
        if len(shadows) != len(self.shadow_params) or any(
                a.shape != b.shape for a, b in zip(shadows, self.shadow_params, strict=True)):
            raise ValueError("the saved ema does not fit this model (another number or shape of tensors)")
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.shadow_params = [s.to(device=old.device, dtype=old.dtype)
                              for s, old in zip(shadows, self.shadow_params, strict=True)]
