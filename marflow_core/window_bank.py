"""PeRFlow window banks: window starts and teacher end points generated once, sharded by seed.

Online PeRFlow (``PeRFlowSampler``) solves the teacher over a window at every training step, ``M``
solver steps = ``M x stages`` teacher forward passes per batch, which for a UNet costs more than the
student's own step. A bank draws, once, ``n_entries`` triples

    x1 ~ data,  k ~ windows (uniform in time),  eps ~ N(0, I),
    x_start = (1 - t_k) eps + t_k x1,        y_end = Phi^T_{t_k -> t_{k+1}}(x_start)

(docs/method.md, section 2, with PeRFlow's noised-data starts) and a sampler then draws rows of the
bank and a fresh time ``t ~ U[t_k, t_{k+1}]`` per row. Trajectory matching on a bank is PeRFlow with
a finite set of window pairs, as reflow is rectified flow with a finite pair bank. Shards are
written atomically and reused when their settings match (``banks.py``, shared with reflow pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import banks
from .models import VelocityField, expand_time
from .seeding import stream
from .solvers import odeint_fixed, uniform_grid
from .trajectory import WindowBatch
from .windows import TimeWindows

SHARD_PATTERN = "window_bank_seed{seed:019d}.pt"
SHARD_STREAM = "window-bank-shard"


@dataclass
class WindowBankConfig:
    """``n_entries`` window pairs in shards of ``shard_size``; ``teacher_steps`` (``M``) steps of
    ``solver`` per window; ``batch_size`` rows per teacher solve."""

    n_entries: int = 16384
    shard_size: int = 4096
    teacher_steps: int = 4
    solver: str = "heun"
    batch_size: int = 1024

    def __post_init__(self) -> None:
        banks.check_bank_config(self, ("n_entries", "shard_size", "teacher_steps", "batch_size"))


def shard_seed(base_seed: int, shard: int) -> int:
    """The seed of bank shard ``shard``: the ``window-bank-shard`` stream of ``base_seed``."""
    return banks.shard_seed(base_seed, SHARD_STREAM, shard)


@torch.no_grad()
def window_bank_shard(
    teacher: VelocityField, data: torch.Tensor, windows: TimeWindows, size: int, seed: int,
    config: WindowBankConfig, data_noise=None,
) -> dict[str, torch.Tensor]:
    """One shard from ``seed``: ``x_start, y_end: (size, ...)`` on ``data``'s device, ``k: (size,)``.

    ``data: (N, ...)`` is the training set (rows drawn with replacement); ``data_noise(x1,
    generator)``, when given, turns the drawn rows into draws of the data law (dequantization),
    from the shard's own stream after every other draw (without it, shards are as before)."""
    gen = stream(seed, "window-bank")
    rows = torch.randint(0, len(data), (size,), generator=gen)
    _, k = windows.sample_times(size, gen, data)  # data: dtype and device only
    eps = torch.randn((size, *data.shape[1:]), generator=gen, dtype=data.dtype).to(data.device)
    x1 = data[rows.to(data.device)]
    if data_noise is not None:
        x1 = data_noise(x1, gen)
    k = k.to(data.device)
    t_start, t_end = windows.bounds(k, x1)
    x_start = (1 - expand_time(t_start, x1)) * eps + expand_time(t_start, x1) * x1
    ends = []
    for i in range(0, size, config.batch_size):
        part = slice(i, i + config.batch_size)
        grid = uniform_grid(t_start[part], t_end[part], config.teacher_steps, x_start[part])
        ends.append(odeint_fixed(teacher, x_start[part], grid, config.solver))
    return {"x_start": x_start, "y_end": torch.cat(ends), "k": k}


def generate_window_bank(
    teacher: VelocityField,
    data: torch.Tensor,
    windows: TimeWindows,
    out_dir: str | Path,
    config: WindowBankConfig,
    base_seed: int = 0,
    progress: bool = True,
    data_noise=None,
) -> list[Path]:
    """Write ``ceil(n_entries / shard_size)`` shards to ``out_dir``, skipping matching ones
    (``data_noise``: see ``window_bank_shard``; the caller's fingerprint of the folder must say
    which law it is)."""
    settings = {"teacher_steps": config.teacher_steps, "solver": config.solver,
                "n_windows": windows.n_windows, "boundaries": windows.boundaries().tolist()}

    def make_shard(seed: int, size: int) -> dict[str, torch.Tensor]:
        return window_bank_shard(teacher, data, windows, size, seed, config, data_noise)

    return banks.generate_shards(out_dir, SHARD_PATTERN, config.n_entries, config.shard_size,
                                 base_seed, SHARD_STREAM, settings, make_shard, progress,
                                 desc="window bank")


def load_window_bank(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Concatenate shards into ``{"x_start", "y_end", "k"}``."""
    return banks.load_shards(paths, ("x_start", "y_end", "k"))


@dataclass
class WindowBankSampler:
    """Draws ``batch_size`` bank rows and ``t ~ U[t_k, t_{k+1}]`` per row: a ``WindowBatch``."""

    windows: TimeWindows
    x_start: torch.Tensor
    y_end: torch.Tensor
    k: torch.Tensor
    batch_size: int

    def __post_init__(self) -> None:
        if not len(self.x_start) == len(self.y_end) == len(self.k):
            raise ValueError(f"bank parts differ in length: {len(self.x_start)}, {len(self.y_end)}, "
                             f"{len(self.k)}")
        if int(self.k.max()) >= self.windows.n_windows:
            raise ValueError(f"bank has window index {int(self.k.max())} but the student has "
                             f"{self.windows.n_windows} windows")

    @classmethod
    def from_bank(cls, windows: TimeWindows, bank: dict[str, torch.Tensor], batch_size: int):
        return cls(windows, bank["x_start"], bank["y_end"], bank["k"], batch_size)

    def __call__(self, batch, generator: torch.Generator | None) -> WindowBatch:
        del batch  # the bank is the data
        idx = torch.randint(0, len(self.k), (self.batch_size,), generator=generator)
        x_start, y_end = self.x_start[idx.to(self.x_start.device)], self.y_end[idx.to(self.y_end.device)]
        k = self.k[idx.to(self.k.device)]
        t_start, t_end = self.windows.bounds(k, x_start)
        u = torch.rand(self.batch_size, generator=generator, dtype=x_start.dtype).to(x_start.device)
        t = t_start + u * (t_end - t_start)
        return WindowBatch(x_start, y_end, k, t, t_start, t_end)
