"""Deterministic global batches: which dataset items step ``s`` reads, independent of the process count.

Global position ``p = s * G + j`` (``G = batch_size * processes * grad_accum``) reads item
``perm_e[p mod n]`` of epoch ``e = p // n`` (``perm_e`` a seeded permutation, stream
``<tag>-data-order``). Micro-step ``m`` of process ``r`` takes positions ``(m * N + r) * b + i``,
``i < b``. Every sample's randomness comes from ``stream(seed, "<tag>-train", s, position)``, so one
process with batch ``2b`` and two processes with batch ``b`` see the same data and draw the same
noise; a resumed run needs no loader state. ``tag`` names the tier (``sd15``, ``cifar10``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from marflow_core.seeding import stream


@dataclass(frozen=True)
class BatchPlan:
    n_items: int
    batch_size: int   # per process and micro-step (b)
    processes: int    # N
    grad_accum: int   # A
    seed: int
    tag: str

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes * self.grad_accum

    def positions(self, step: int, micro: int, rank: int) -> list[int]:
        first = step * self.global_batch + (micro * self.processes + rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def item(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_items)
        return int(_permutation(self.seed, f"{self.tag}-data-order", epoch, self.n_items)[offset])

    def items(self, positions: list[int]) -> torch.Tensor:
        """``(len(positions),)`` long: the dataset item of each position."""
        return torch.tensor([self.item(p) for p in positions], dtype=torch.long)

    def generators(self, step: int, positions: list[int]) -> list[torch.Generator]:
        """One CPU generator per sample: ``stream(seed, "<tag>-train", step, position)``."""
        return [stream(self.seed, f"{self.tag}-train", step, p) for p in positions]


@lru_cache(maxsize=4)
def _permutation(seed: int, name: str, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=stream(seed, name, epoch))
