"""COCO-2017 validation prompts and reference images for the text-to-image protocol.

Prompts: the first caption (lowest annotation id) of each image, images in ascending id, the first N.
References: the same images, centre-cropped to a square and resized to the evaluation resolution.
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
    """The first ``n`` prompts of ``captions_val2017.json`` (one per image, see the module doc)."""
    data = json.loads(Path(annotations).read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    first: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        key = (ann["id"], ann["caption"].strip())
        if ann["image_id"] not in first or key < first[ann["image_id"]]:
            first[ann["image_id"]] = key
    ids = sorted(first)
    if len(ids) < n:
        raise MissingInput(f"n_prompts = {n}: {annotations} has captions for {len(ids)} images only")
    return [CocoPrompt(i, files[i], first[i][1]) for i in ids[:n]]


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop, then bicubic resize to ``size`` x ``size`` (RGB)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def check_reference_images(image_dir: Path, prompts: list[CocoPrompt]) -> None:
    """Every image of ``prompts`` is in ``image_dir``, or ``MissingInput`` naming the first absent one."""
    for p in prompts:
        if not (image_dir / p.file_name).is_file():
            raise MissingInput(f"coco_dir = {str(image_dir.parent)!r}: missing {COCO_IMAGES}/{p.file_name} "
                               f"(image {p.image_id}); unzip val2017.zip there (docs/gpu.md)")


def write_references(image_dir: Path, prompts: list[CocoPrompt], size: int, out: Path) -> Path:
    """``out/<image_id>.png`` for every prompt, centre-cropped; written to a temporary folder and
    renamed, and reused when it already holds the same images."""
    if out.is_dir() and sorted(p.name for p in out.iterdir()) == sorted(f"{p.image_id:012d}.png" for p in prompts):
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in prompts:
        with Image.open(image_dir / p.file_name) as img:
            center_crop_resize(img, size).save(tmp / f"{p.image_id:012d}.png")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
