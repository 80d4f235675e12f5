"""Content digests of saved tensors: a file that still opens but was changed after saving is refused.

``torch.load`` checks the zip container, not the bytes of the tensors in it: overwrite a few hundred
bytes inside a weight tensor and the file loads, with wrong (often NaN) weights. Every file the
library saves for later use (training checkpoints, pair and window bank shards) therefore carries
``tensor_sha256``, a SHA-256 over every tensor in it (key path, dtype, shape and raw bytes, in a
fixed order), checked on every load; non-finite weights are refused on their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

DIGEST_KEY = "tensor_sha256"


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(key path, tensor)`` of every tensor in nested dicts / lists / tuples, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if not (path == "" and key == DIGEST_KEY):
                yield from _tensors(obj[key], f"{path}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{i}")


def tensor_digest(obj: Any) -> str:
    """SHA-256 over every tensor of ``obj``: its key path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, tensor in _tensors(obj):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{path}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def with_digest(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its ``tensor_sha256`` added (to be saved)."""
    return {**state, DIGEST_KEY: tensor_digest(state)}


def verify_digest(state: dict[str, Any], path: str | Path) -> None:
    """Raise ``CheckpointError`` naming ``path`` unless ``state``'s tensors match its digest."""
    saved = state.get(DIGEST_KEY)
    if saved is None:
        raise CheckpointError(f"{path}: has no content digest ({DIGEST_KEY}): written by an older marflow "
                              f"or by another program; delete it and rerun the run that wrote it")
    if tensor_digest(state) != saved:
        raise CheckpointError(f"{path}: its tensors do not match the content digest saved with them (the file "
                              f"was changed or damaged after it was written); delete it and rerun the run "
                              f"that wrote it")


def non_finite_tensors(obj: Any) -> list[str]:
    """Key paths of the floating-point tensors of ``obj`` that hold a NaN or an infinity."""
    return [path for path, t in _tensors(obj) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def verified_load(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a file saved with ``with_digest``, its digest checked; an unreadable file,
    one without a digest and one whose tensors changed raise ``CheckpointError`` naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for a damaged file
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {detail}); delete it and "
                              f"rerun the run that wrote it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a marflow file (a {type(state).__name__}, not a mapping)")
    verify_digest(state, path)
    return state
