"""Image-caption training data: a caption folder (``images/`` + ``captions.jsonl``) as a torch Dataset.

Each item is ``{"pixel_values": (3, R, R) in [-1, 1], "input_ids": (77,) CLIP token ids}``:
resize the short side to ``R`` (bicubic... bilinear, antialiased), centre- or random-crop, optional
horizontal flip, as in diffusers' ``train_text_to_image.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .inputs import read_caption_folder


class CaptionFolder(Dataset):
    """Image-caption pairs of a caption folder, tokenized with the pipeline's CLIP tokenizer."""

    def __init__(self, root: str | Path, tokenizer, resolution: int, center_crop: bool = True,
                 random_flip: bool = False) -> None:
        from torchvision import transforms

        self.pairs = read_caption_folder(root)
        self.tokenizer = tokenizer
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, caption = self.pairs[i]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image named in captions.jsonl is missing")
        with Image.open(path) as img:
            pixels = self.transform(img.convert("RGB"))
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}
