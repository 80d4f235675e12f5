"""Sharded banks: tensors generated once, one shard per derived seed, each written atomically.

Reflow pair banks (``reflow.py``) and PeRFlow window banks (``window_bank.py``) are both a fixed
number of rows that a teacher solve produces from random draws. They share this machinery:

* shard ``i`` is made from seed ``derive_seed(base_seed, stream_name, i)``, so a bank grown from
  ``n`` to ``n' > n`` rows reuses every full shard of the smaller one;
* a shard is written atomically (``atomic_torch_save``), so an interrupted generation never leaves a
  half-written file, and it resumes by skipping the shards already on disk;
* an existing shard is reused only if it has the expected row count and was made with the same
  ``settings`` (solver, steps, windows, ...), stored in the shard itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .atomic import atomic_torch_save
from .errors import CheckpointError, InvalidParameter
from .integrity import verified_load, with_digest
from .seeding import derive_seed
from .solvers import FIXED_METHODS

#: ``make_shard(seed, size) -> {name: (size, ...) tensor}``
ShardMaker = Callable[[int, int], dict[str, torch.Tensor]]


def check_bank_config(config: Any, counts: tuple[str, ...]) -> None:
    """A bank config's checks: every field in ``counts`` >= 1, ``solver`` a fixed-grid solver."""
    for key in counts:
        if getattr(config, key) < 1:
            raise InvalidParameter(key, getattr(config, key), "must be >= 1")
    if config.solver not in FIXED_METHODS:
        raise InvalidParameter("solver", config.solver, f"one of {FIXED_METHODS}")


def shard_seed(base_seed: int, stream_name: str, shard: int) -> int:
    """The seed of shard ``shard``: stream ``stream_name`` of ``base_seed``."""
    return derive_seed(base_seed, stream_name, shard)


def generate_shards(
    out_dir: str | Path,
    pattern: str,
    n_rows: int,
    shard_size: int,
    base_seed: int,
    stream_name: str,
    settings: dict[str, Any],
    make_shard: ShardMaker,
    progress: bool = True,
    desc: str = "bank",
) -> list[Path]:
    """Write ``ceil(n_rows / shard_size)`` shards named ``pattern.format(seed=...)`` to ``out_dir``,
    skipping shards that already match; returns their paths in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in tqdm(range(-(-n_rows // shard_size)), desc=desc, disable=not progress):
        seed = shard_seed(base_seed, stream_name, shard)
        path = out / pattern.format(seed=seed)
        size = min(shard_size, n_rows - shard * shard_size)
        if not shard_matches(path, size, settings):
            rows = make_shard(seed, size)
            atomic_torch_save(with_digest({**{k: v.cpu() for k, v in rows.items()}, **settings,
                                           "seed": seed, "rows": size}), path)
        paths.append(path)
    return paths


def shard_matches(path: Path, size: int, settings: dict[str, Any]) -> bool:
    """An existing shard is reused only if it has ``size`` rows made with the same ``settings``
    and its tensors match their content digest (a damaged shard is made again)."""
    if not path.exists():
        return False
    try:
        shard = verified_load(path, mmap=True)
    except CheckpointError:
        return False
    return shard.get("rows") == size and all(shard.get(k) == v for k, v in settings.items())


def load_shards(paths: list[Path], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The shards' tensors ``keys``, concatenated along rows; each shard's digest is checked
    (``CheckpointError`` naming a damaged one)."""
    shards = [verified_load(p) for p in paths]
    return {key: torch.cat([s[key] for s in shards]) for key in keys}
