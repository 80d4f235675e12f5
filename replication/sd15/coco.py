"""COCO-2017 validation prompts and reference images, prepared as the published protocol does.

The published protocol (Rectified Diffusion's evaluation code, G-U-N/Rectified-Diffusion
``generate_5k.py``; ``peers.yaml``, ``coco2017_5k_512``): each image's first caption in the order
of ``captions_val2017.json`` (``caption_list[:1]``), stripped; reference images resized with
torchvision's ``Resize(size, LANCZOS)`` (the short side to ``size``, the long side to
``int(size * long / short)``) and then ``CenterCrop(size)`` (offsets ``int(round((w - size) / 2))``,
Python's round, half to even). Our prompts are the first N images by ascending image id (all 5,000
of val2017 at N = 5,000, the published set).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .inputs import COCO_IMAGES, MissingInput


@dataclass(frozen=True)
class CocoPrompt:
    image_id: int
    file_name: str
    caption: str


def coco_prompts(annotations: Path, n: int) -> list[CocoPrompt]:
    """The first ``n`` prompts of ``captions_val2017.json``: images by ascending id, each with its
    first caption in the file's order (see the module doc)."""
    data = json.loads(Path(annotations).read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    first: dict[int, str] = {}
    for ann in data["annotations"]:
        first.setdefault(ann["image_id"], ann["caption"].strip())
    ids = sorted(i for i in first if i in files)
    if len(ids) < n:
        raise MissingInput(f"n_prompts = {n}: {annotations} has captions for {len(ids)} images only")
    return [CocoPrompt(i, files[i], first[i]) for i in ids[:n]]


def resize_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """``((w, h) after the short-side resize, (left, top, right, bottom) of the centre crop)``: the
    geometry of torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a ``width`` x ``height``
    image (a crop larger than the resized image is not needed: the short side is ``size``)."""
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return new, (left, top, left + size, top + size)


def lanczos_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The published reference preprocessing: RGB, Lanczos resize of the short side to ``size``,
    centre crop ``size`` x ``size`` (``resize_crop_box``)."""
    img = img.convert("RGB")
    new, box = resize_crop_box(*img.size, size)
    if new != img.size:
        img = img.resize(new, Image.LANCZOS)
    return img.crop(box)


def check_reference_images(image_dir: Path, prompts: list[CocoPrompt]) -> None:
    """Every image of ``prompts`` is in ``image_dir``, or ``MissingInput`` naming the first absent one."""
    for p in prompts:
        if not (image_dir / p.file_name).is_file():
            raise MissingInput(f"coco_dir = {str(image_dir.parent)!r}: missing {COCO_IMAGES}/{p.file_name} "
                               f"(image {p.image_id}); unzip val2017.zip there (docs/gpu.md)")


def write_references(image_dir: Path, prompts: list[CocoPrompt], size: int, out: Path) -> Path:
    """``out/<image_id>.png`` for every prompt (``lanczos_center_crop``); written to a temporary
    folder and renamed, and reused when it already holds the same images."""
    if out.is_dir() and sorted(p.name for p in out.iterdir()) == sorted(f"{p.image_id:012d}.png" for p in prompts):
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in prompts:
        with Image.open(image_dir / p.file_name) as img:
            lanczos_center_crop(img, size).save(tmp / f"{p.image_id:012d}.png")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
