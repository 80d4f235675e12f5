"""Errors shared by the library: bad config values, unusable checkpoints, non-finite training."""

from __future__ import annotations

from typing import Any


class InvalidParameter(ValueError):
    """A config value out of its domain; ``key``, ``value`` and ``why`` let callers name the full path."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"{key}={value!r}: {why}")
        self.key, self.value, self.why = key, value, why


class NonFiniteLossError(RuntimeError):
    """Raised, before any parameter update, when a loss term, a gradient or a teacher output is NaN
    or infinite, or a loss term explodes past ``TrainConfig.loss_limit``."""


class NonFiniteOutputError(RuntimeError):
    """A sampler or a density computation produced NaN or infinite values: broken weights or a
    diverging field, never to be read as a property of the method (a folded map has finite outputs)."""


def require_finite(tensor, what: str) -> None:
    """Raise ``NonFiniteOutputError`` naming ``what`` and the count if ``tensor`` is not all finite."""
    import torch

    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.ndim else bad
        raise NonFiniteOutputError(f"{what}: {int(rows.sum())} of {rows.numel()} samples are NaN or "
                                   f"infinite (broken weights or a diverging field, not a folded map)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable or truncated, another architecture, another
    method. The message names the file."""
