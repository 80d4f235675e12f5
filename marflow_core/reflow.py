"""Classic reflow (``K = 1``): teacher-ODE pairs ``(x0, x1 = Phi^T(x0))``, sharded by seed.

Pairs are generated once, one shard per seed, each written atomically (``banks.py``), so an
interrupted generation resumes by skipping finished shards and a larger bank reuses the smaller
one's shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import banks
from .models import VelocityField
from .solvers import odeint_fixed, uniform_grid
from .trajectory import WindowBatch

SHARD_PATTERN = "pairs_seed{seed:019d}.pt"
SHARD_STREAM = "reflow-shard"


@dataclass
class ReflowPairConfig:
    """A pair bank: ``n_pairs`` teacher pairs in shards of ``shard_size``, ``steps`` of ``solver``;
    ``batch_size`` rows go through each teacher solve (memory and speed; the pairs are the same up
    to floating-point rounding)."""

    n_pairs: int = 20000
    shard_size: int = 5000
    steps: int = 32
    solver: str = "rk4"
    batch_size: int = 4096

    def __post_init__(self) -> None:
        banks.check_bank_config(self, ("n_pairs", "shard_size", "steps", "batch_size"))


def shard_seed(base_seed: int, shard: int) -> int:
    """The seed of shard ``shard``: the ``reflow-shard`` stream of ``base_seed``."""
    return banks.shard_seed(base_seed, SHARD_STREAM, shard)


@torch.no_grad()
def teacher_pairs(
    teacher: VelocityField,
    n: int,
    dim_shape: tuple[int, ...],
    seed: int,
    steps: int = 32,
    method: str = "rk4",
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs ``(x0, Phi^T_{0->1}(x0))`` with ``x0 ~ N(0, I)`` drawn from ``seed``; shapes ``(n, *dim_shape)``."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *dim_shape), generator=generator, dtype=dtype).to(device)
    chunks = []
    for start in range(0, n, batch_size):
        xb = x0[start : start + batch_size]
        chunks.append(odeint_fixed(teacher, xb, uniform_grid(0.0, 1.0, steps, xb), method))
    return x0, torch.cat(chunks)


def generate_reflow_pairs(
    teacher: VelocityField,
    out_dir: str | Path,
    n_pairs: int,
    shard_size: int,
    dim_shape: tuple[int, ...],
    base_seed: int = 0,
    steps: int = 32,
    method: str = "rk4",
    device: torch.device | str = "cpu",
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4096,
) -> list[Path]:
    """Write ``ceil(n_pairs / shard_size)`` shards of teacher pairs to ``out_dir``; skip existing ones.

    An existing shard is kept only if its size, ``steps`` and ``method`` match (a bank grown from
    10 to 12 pairs regenerates its partial last shard); the teacher itself is not checked.
    ``batch_size`` rows go through each teacher solve.
    """
    ReflowPairConfig(n_pairs, shard_size, steps, method, batch_size)  # the one copy of the checks

    def make_shard(seed: int, size: int) -> dict[str, torch.Tensor]:
        x0, x1 = teacher_pairs(teacher, size, dim_shape, seed, steps, method, batch_size, dtype, device)
        return {"x0": x0, "x1": x1}

    return banks.generate_shards(out_dir, SHARD_PATTERN, n_pairs, shard_size, base_seed, SHARD_STREAM,
                                 {"steps": steps, "method": method}, make_shard, progress,
                                 desc="reflow pairs")


def load_pairs(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate shards into ``(x0, x1)``."""
    pairs = banks.load_shards(paths, ("x0", "x1"))
    return pairs["x0"], pairs["x1"]


@dataclass
class ReflowPairSampler:
    """Draws a batch of stored pairs and a uniform time: a ``WindowBatch`` with the single window."""

    x0: torch.Tensor
    x1: torch.Tensor
    batch_size: int

    def __call__(self, batch, generator: torch.Generator | None) -> WindowBatch:
        del batch  # the pair bank is the data
        idx = torch.randint(0, len(self.x0), (self.batch_size,), generator=generator)
        x0, x1 = self.x0[idx], self.x1[idx]
        t = torch.rand(self.batch_size, generator=generator, dtype=x0.dtype).to(x0.device)
        zeros, ones = torch.zeros_like(t), torch.ones_like(t)
        return WindowBatch(x0, x1, torch.zeros_like(idx), t, zeros, ones)
