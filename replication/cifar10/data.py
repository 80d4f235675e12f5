"""The standard python-pickle CIFAR-10 (``cifar-10-batches-py``), as float images in ``[-1, 1]``.

Each batch file is a pickled dict with ``b"data"``: uint8 ``(N, 3072)`` (1024 red, 1024 green, 1024
blue values of a 32x32 image, row-major) and ``b"labels"``: ``N`` ints; ``batches.meta`` holds
``b"label_names"``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

FOLDER = "cifar-10-batches-py"
SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class CifarFileMissing(FileNotFoundError):
    """A CIFAR-10 file is absent; the message names it and where it must go."""


def _path(root: str | Path, name: str) -> Path:
    path = Path(root) / FOLDER / name
    if not path.is_file():
        raise CifarFileMissing(f"CIFAR-10 file missing: {path} (extract {SOURCE} into {Path(root)} "
                               f"so that {Path(root) / FOLDER}/ holds {name})")
    return path


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def load_cifar10_uint8(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, 32, 32), labels long (N,))`` of ``split`` (``train``: 50,000, ``test``: 10,000),
    batches in their standard order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: one of {sorted(SPLITS)}")
    data, labels = [], []
    for name in SPLITS[split]:
        batch = _unpickle(_path(root, name))
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.long)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]``: ``x / 127.5 - 1``."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float ``[-1, 1]`` -> uint8, clamped: ``round((x + 1) 127.5)``."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_cifar10(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images float32 (N, 3, 32, 32) in [-1, 1], labels long (N,))``."""
    images, labels = load_cifar10_uint8(root, split)
    return to_unit_range(images), labels


def load_label_names(root: str | Path) -> list[str]:
    """The ten class names of ``batches.meta``."""
    return [n.decode() for n in _unpickle(_path(root, "batches.meta"))[b"label_names"]]


def write_batch(path: str | Path, images: np.ndarray, labels: list[int]) -> None:
    """Write one batch in the standard format (``images`` uint8 ``(N, 3, 32, 32)``): tiny stand-ins."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = {b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1),
               b"labels": list(labels), b"batch_label": b"stand-in"}
    with open(path, "wb") as fh:
        pickle.dump(payload, fh)
