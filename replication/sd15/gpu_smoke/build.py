"""SD-1.5-shaped inputs with random weights, built offline: a diffusers pipeline folder and a caption
folder in the layouts the tier's loaders read (``components.load_components``, ``inputs.py``,
``data.CaptionFolder``).

``sd15`` components use the published configs of ``sd15_config/`` (see its ``SOURCE.md``): the real
UNet2DConditionModel (859.5M parameters), AutoencoderKL (83.7M) and CLIP ViT-L/14 text encoder
(123.1M), the PNDM scheduler config and the real CLIP BPE tokenizer (rebuilt from open_clip's
vocabulary, as ``tiny.write_clip_tokenizer`` does). ``tiny`` components are
``tiny.build_tiny_sd``. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "sd15_config"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "scheduler")


def sd15_config(part: str) -> dict:
    """The published config of ``part`` (``unet`` | ``vae`` | ``text_encoder`` | ``scheduler``)."""
    if part not in PIPELINE_PARTS:
        raise ValueError(f"part = {part!r}: one of {PIPELINE_PARTS}")
    return json.loads((CONFIG_DIR / f"{part}.json").read_text())


def sd15_modules():
    """``(unet, vae, text_encoder)`` of the published configs, randomly initialised (the current
    default device and torch seed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(sd15_config("unet"))
    vae = AutoencoderKL.from_config(sd15_config("vae"))
    text = {k: v for k, v in sd15_config("text_encoder").items() if k not in ("architectures", "model_type")}
    return unet, vae, CLIPTextModel(CLIPTextConfig(**text))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_sd15_random(out: str | Path, seed: int = 0) -> Path:
    """A random-weight SD 1.5 pipeline folder at ``out`` (written beside it, then renamed)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..tiny import CLIP_VOCAB_SIZE, write_clip_tokenizer

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    unet, vae, text_encoder = sd15_modules()
    write_clip_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    scheduler = PNDMScheduler.from_config(sd15_config("scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def build_pipeline(kind: str, out: str | Path, seed: int = 0) -> Path:
    """``kind`` ``sd15`` (``build_sd15_random``) or ``tiny`` (``tiny.build_tiny_sd``) at ``out``."""
    from ..tiny import build_tiny_sd

    if kind == "sd15":
        return build_sd15_random(out, seed)
    if kind == "tiny":
        return build_tiny_sd(out, seed)
    raise ValueError(f"components = {kind!r}: one of ('sd15', 'tiny')")


def build_captions(out: str | Path, n_images: int, size: int, seed: int = 0) -> Path:
    """A caption folder of ``n_images`` random ``size`` x ``size`` px images (``tiny.write_caption_folder``)."""
    from ..tiny import write_caption_folder

    return write_caption_folder(out, n=n_images, size=(size, size), seed=seed)


def folder_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def saved_param_counts(pipeline: str | Path) -> dict[str, int]:
    """Parameter counts of the saved UNet, VAE and text encoder (read from the safetensors headers)."""
    from safetensors import safe_open

    counts = {}
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        files = sorted((Path(pipeline) / part).glob(f"{name}*.safetensors"))
        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    total += math.prod(fh.get_slice(key).get_shape())
        counts[part] = total
    return counts
