"""SD 1.5's micro-batches of the shared deterministic batch plan (``replication.gpu_common.batches``:
the plan with ``tag = "sd15"``, so sample randomness is ``stream(seed, "sd15-train", s, position)``).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..gpu_common.batches import BatchPlan

__all__ = ["BatchPlan", "PlannedBatches", "sd15_plan"]

TAG = "sd15"


def sd15_plan(n_items: int, batch_size: int, processes: int, grad_accum: int, seed: int) -> BatchPlan:
    """The SD tier's plan (streams ``sd15-data-order`` and ``sd15-train``)."""
    return BatchPlan(n_items, batch_size, processes, grad_accum, seed, TAG)


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
