"""Tiny random-weight Stable-Diffusion-style pipelines, built offline (tests and CPU smoke runs).

``build_tiny_sd(out)`` writes a folder with the same layout as ``runwayml/stable-diffusion-v1-5``
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), so the
trainer and the evaluator load it exactly like the real weights. The UNet runs on ``4 x 8 x 8``
latents (VAE down-sampling factor 2, so 16 px images); the tokenizer is the real CLIP BPE tokenizer
(vocabulary 49,408) rebuilt from the vocabulary file that ``open_clip`` ships.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

#: size of the CLIP BPE vocabulary (256 bytes, 256 bytes + ``</w>``, 48,894 merges, 2 specials)
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (the same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` of the CLIP tokenizer from ``open_clip``'s ``bpe_simple_vocab_16e6.txt.gz``."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{path}: built a vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer(out: Path) -> None:
    """A ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``, configs) from the open_clip vocabulary."""
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_files()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(out)


def build_tiny_sd(out: str | Path, seed: int = 0, text_dim: int = 32) -> Path:
    """Write a random-weight SD-style pipeline folder to ``out``; returns ``out``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    write_clip_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def write_caption_folder(out: str | Path, n: int = 6, size: tuple[int, int] = (24, 20), seed: int = 0) -> Path:
    """A caption folder (``images/*.jpg`` + ``captions.jsonl``) of ``n`` random images."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out / "images" / f"{i:04d}.jpg")
        lines.append(json.dumps({"image": f"{i:04d}.jpg", "caption": f"a photo of object number {i}"}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out


def write_coco_folder(out: str | Path, n: int = 6, seed: int = 0) -> Path:
    """A COCO-2017-like folder: ``annotations/captions_val2017.json`` (two captions per image, ids out
    of order) and ``val2017/<12-digit id>.jpg`` of non-square random images."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "val2017").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for j, image_id in enumerate(sorted(rng.choice(10_000, n, replace=False).tolist(), reverse=True)):
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(out / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "height": 30, "width": 40})
        anns.append({"id": 1000 + 2 * j + 1, "image_id": image_id, "caption": f"second caption {image_id}"})
        anns.append({"id": 1000 + 2 * j, "image_id": image_id, "caption": f"first caption {image_id}"})
    (out / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return out


def register_tiny_clip(name: str = "tiny-test-clip") -> str:
    """Register a tiny open_clip architecture (random weights, CLIP BPE tokenizer) as ``name``."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[name] = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 1},
    }
    assert name in open_clip.list_models()
    return name


def tiny_fid_extractor_class():
    """A torch-fidelity feature extractor: a fixed random projection of 8x8 average-pooled pixels
    (64 features), standing in for Inception in tests."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("proj", torch.randn(3 * 8 * 8, 64, generator=gen) / 8)

        @staticmethod
        def get_provided_features_list():
            return ("64",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "64"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)
            return (torch.tanh(x @ self.proj).double(),)

    return TinyExtractor
