"""The one seed-mixing rule of the code base: named, independent random streams from a root seed.

Every random draw that must be reproducible (a training step, a reflow shard, an evaluation batch)
takes its generator from ``stream(root, name, *indices)``. The seed is the first 63 bits of
``sha256("root/name/i1/i2...")``, so two different names or indices never share a stream, and
adding a new stream never shifts an existing one (no ``seed + 3`` offsets that can collide).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(root: int, name: str, *indices: int) -> int:
    """A 63-bit seed for stream ``name`` (and optional integer ``indices``) of ``root``."""
    if not name or "/" in name:
        raise ValueError(f"a stream name must be non-empty and contain no '/', got {name!r}")
    key = "/".join([str(int(root)), name, *(str(int(i)) for i in indices)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & (2**63 - 1)


def stream(root: int, name: str, *indices: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(root, name, *indices)``."""
    return torch.Generator().manual_seed(derive_seed(root, name, *indices))
