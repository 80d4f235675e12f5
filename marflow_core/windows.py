"""Time windows ``0 = t_0 < t_1 < ... < t_K = 1`` for reflow (``K = 1``) and PeRFlow (``K > 1``).

Window ``k`` is ``[t_k, t_{k+1})``; the last one includes ``t = 1``. The straight segment and its
constant velocity target (docs/method.md, section 2) live here once, shared by trainer and sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models import expand_time


class TimeWindows:
    """``K`` windows over ``[0, 1]``: equal (``TimeWindows(4)``) or explicit boundaries."""

    def __init__(self, n_windows: int = 1, boundaries: Sequence[float] | None = None) -> None:
        if boundaries is None:
            if int(n_windows) != n_windows or n_windows < 1:
                raise ValueError(f"number of windows K must be an integer >= 1, got {n_windows}")
            b = torch.linspace(0.0, 1.0, int(n_windows) + 1, dtype=torch.float64)
        else:
            b = torch.as_tensor(boundaries, dtype=torch.float64)
            ok = b.ndim == 1 and len(b) >= 2 and b[0] == 0.0 and b[-1] == 1.0
            if not ok or not bool((b[1:] > b[:-1]).all()):
                raise ValueError(f"window boundaries must increase from 0 to 1, got {b.tolist()}")
        self._boundaries = b

    @property
    def n_windows(self) -> int:
        return len(self._boundaries) - 1

    def boundaries(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """``(K + 1,)`` boundaries, in ``like``'s dtype and device."""
        if like is None:
            return self._boundaries.clone()
        return self._boundaries.to(dtype=like.dtype, device=like.device)

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)`` long: the window containing each ``t`` (``t_k`` opens window ``k``; ``1`` is in ``K-1``)."""
        inner = self._boundaries[1:-1].to(device=t.device)
        return torch.searchsorted(inner, t.to(torch.float64), right=True)

    def bounds(self, k: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t_k, t_{k+1})``, each ``(B,)``."""
        b = self.boundaries(like)
        return b[k], b[k + 1]

    def sample_times(self, batch: int, generator: torch.Generator | None, like: torch.Tensor):
        """``t ~ U[0, 1)`` per sample and its window index ``k`` (windows drawn by length)."""
        t = torch.rand(batch, generator=generator, dtype=like.dtype).to(like.device)
        return t, self.index(t)

    def step_grid(self, n_steps: int, strict: bool = True) -> torch.Tensor:
        """``(N + 1,)`` times of an ``N``-step sampler, spreading steps over the windows.

        With ``N >= K`` every window gets at least one step and its boundaries are grid points
        (steps allotted by window length, largest remainder). With ``N < K`` the sampler cannot
        respect the windows: ``strict`` raises; otherwise a uniform ``N``-step grid is returned.
        """
        if n_steps < 1:
            raise ValueError(f"number of sampling steps must be >= 1, got {n_steps}")
        k = self.n_windows
        if n_steps < k:
            if strict:
                raise ValueError(f"{n_steps} steps cannot cover {k} windows (need >= one per window)")
            return torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
        lengths = self._boundaries[1:] - self._boundaries[:-1]
        share = 1 + (n_steps - k) * lengths  # one each, the rest by length
        counts = share.floor().long()
        remainder = n_steps - int(counts.sum())
        order = torch.argsort(share - counts, descending=True)
        counts[order[:remainder]] += 1
        pieces = [
            torch.linspace(float(a), float(b), int(c) + 1, dtype=torch.float64)[:-1]
            for a, b, c in zip(self._boundaries[:-1], self._boundaries[1:], counts, strict=True)
        ]
        return torch.cat([*pieces, torch.ones(1, dtype=torch.float64)])


def segment_point(
    x_start: torch.Tensor, y_end: torch.Tensor, t: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor
) -> torch.Tensor:
    """``x_t = x_s + (t - t_k) / (t_{k+1} - t_k) (y_T - x_s)``; tensors ``(B, ...)``, times ``(B,)``."""
    frac = expand_time((t - t_start) / (t_end - t_start), x_start)
    return x_start + frac * (y_end - x_start)


def segment_velocity(
    x_start: torch.Tensor, y_end: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor
) -> torch.Tensor:
    """Constant velocity target ``(y_T - x_s) / (t_{k+1} - t_k)``."""
    return (y_end - x_start) / expand_time(t_end - t_start, x_start)
