"""Deterministic global batches: which dataset items step ``s`` reads, independent of the process count.

Global position ``p = s * G + j`` (``G = batch_size * processes * grad_accum``) reads item
``perm_e[p mod n]`` of epoch ``e = p // n`` (``perm_e`` a seeded permutation). Micro-step ``m`` of
process ``r`` takes positions ``(m * N + r) * b + i``, ``i < b``. Every sample's randomness comes from
``stream(seed, "sd15-train", s, position)``, so one process with batch ``2b`` and two processes with
batch ``b`` see the same data and draw the same noise; a resumed run needs no loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from marflow_core.seeding import stream


@dataclass(frozen=True)
class BatchPlan:
    n_items: int
    batch_size: int   # per process and micro-step (b)
    processes: int    # N
    grad_accum: int   # A
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes * self.grad_accum

    def positions(self, step: int, micro: int, rank: int) -> list[int]:
        first = step * self.global_batch + (micro * self.processes + rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def item(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_items)
        return int(_permutation(self.seed, epoch, self.n_items)[offset])

    def generators(self, step: int, positions: list[int]) -> list[torch.Generator]:
        """One CPU generator per sample: ``stream(seed, "sd15-train", step, position)``."""
        return [stream(self.seed, "sd15-train", step, p) for p in positions]


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=stream(seed, "sd15-data-order", epoch))


class PlannedBatches(Dataset):
    """Item ``k`` is micro-batch ``k`` (``step = start + k // A``, ``micro = k % A``) of process ``rank``:
    ``{"pixel_values", "input_ids", "positions", "step"}`` stacked over the ``b`` samples."""

    def __init__(self, dataset: Dataset, plan: BatchPlan, rank: int, start_step: int, steps: int) -> None:
        self.dataset, self.plan, self.rank = dataset, plan, rank
        self.start, self.steps = start_step, steps

    def __len__(self) -> int:
        return (self.steps - self.start) * self.plan.grad_accum

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        step, micro = self.start + k // self.plan.grad_accum, k % self.plan.grad_accum
        positions = self.plan.positions(step, micro, self.rank)
        items = [self.dataset[self.plan.item(p)] for p in positions]
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "input_ids": torch.stack([it["input_ids"] for it in items]),
                "positions": torch.tensor(positions), "step": torch.tensor(step)}
