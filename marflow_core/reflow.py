"""Classic reflow (``K = 1``): teacher-ODE pairs ``(x0, x1 = Phi^T(x0))``, sharded by seed.

Pairs are generated once, one shard per seed, each written atomically, so an interrupted
generation resumes by skipping finished shards and a larger bank reuses the smaller one's shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_torch_save
from .errors import InvalidParameter
from .models import VelocityField
from .seeding import derive_seed
from .solvers import FIXED_METHODS, odeint_fixed, uniform_grid
from .trajectory import WindowBatch

SHARD_PATTERN = "pairs_seed{seed:019d}.pt"


@dataclass
class ReflowPairConfig:
    """A pair bank: ``n_pairs`` teacher pairs in shards of ``shard_size``, ``steps`` of ``solver``."""

    n_pairs: int = 20000
    shard_size: int = 5000
    steps: int = 32
    solver: str = "rk4"

    def __post_init__(self) -> None:
        for key in ("n_pairs", "shard_size", "steps"):
            if getattr(self, key) < 1:
                raise InvalidParameter(key, getattr(self, key), "must be >= 1")
        if self.solver not in FIXED_METHODS:
            raise InvalidParameter("solver", self.solver, f"one of {FIXED_METHODS}")


def shard_seed(base_seed: int, shard: int) -> int:
    """The seed of shard ``shard``: the ``reflow-shard`` stream of ``base_seed``."""
    return derive_seed(base_seed, "reflow-shard", shard)


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
) -> list[Path]:
    """Write ``ceil(n_pairs / shard_size)`` shards of teacher pairs to ``out_dir``; skip existing ones.

    An existing shard is kept only if its size, ``steps`` and ``method`` match (a bank grown from
    10 to 12 pairs regenerates its partial last shard); the teacher itself is not checked.
    """
    ReflowPairConfig(n_pairs, shard_size, steps, method)  # the one copy of the checks
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-n_pairs // shard_size)
    paths = []
    for shard in tqdm(range(n_shards), desc="reflow pairs", disable=not progress):
        seed = shard_seed(base_seed, shard)
        path = out / SHARD_PATTERN.format(seed=seed)
        size = min(shard_size, n_pairs - shard * shard_size)
        if not _shard_matches(path, size, steps, method):
            x0, x1 = teacher_pairs(teacher, size, dim_shape, seed, steps, method, dtype=dtype,
                                   device=device)
            atomic_torch_save({"x0": x0.cpu(), "x1": x1.cpu(), "seed": seed, "steps": steps,
                               "method": method}, path)
        paths.append(path)
    return paths


def _shard_matches(path: Path, size: int, steps: int, method: str) -> bool:
    """An existing shard is reused only if it has ``size`` pairs made with the same solver settings."""
    if not path.exists():
        return False
    shard = torch.load(path, weights_only=True, mmap=True)
    return len(shard["x0"]) == size and shard.get("steps") == steps and shard.get("method") == method


def load_pairs(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate shards into ``(x0, x1)``."""
    shards = [torch.load(p, weights_only=True) for p in paths]
    return torch.cat([s["x0"] for s in shards]), torch.cat([s["x1"] for s in shards])


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
