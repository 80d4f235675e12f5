"""FID (torch-fidelity) and CLIP score (open_clip) of generated images.

FID: ``torch_fidelity.calculate_metrics(fid=True)`` between a folder of generated PNGs and a folder of
reference PNGs, with any registered feature extractor (``inception-v3-compat`` by default; tests
register tiny ones with ``register_extractor``).

CLIP score: mean over pairs of the cosine similarity ``<f_img, f_txt> / (|f_img| |f_txt|)`` of an
open_clip model (ViT-g-14 / laion2b_s12b_b42k by default), on the scale of the reference table
(0.294), not x100 and not clipped at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def register_extractor(name: str, cls: type) -> None:
    """Make a torch-fidelity ``FeatureExtractorBase`` subclass available as ``fid_extractor: name``."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, cls)


def fid(generated: Path, reference: Path, extractor: str, weights: str | None, cuda: bool,
        batch_size: int = 64) -> float:
    """FID between two image folders (torch-fidelity; its feature cache is not used)."""
    import torch_fidelity

    kwargs = {"feature_extractor": extractor}
    if weights:
        kwargs["feature_extractor_weights_path"] = weights
    out = torch_fidelity.calculate_metrics(input1=str(generated), input2=str(reference), fid=True, cuda=cuda,
                                           batch_size=batch_size, verbose=False, cache=False, **kwargs)
    return float(out["frechet_inception_distance"])


class ClipScorer:
    """Cosine similarity of open_clip image and text embeddings, per (image, caption) pair."""

    def __init__(self, model_name: str, pretrained: str | None, device: torch.device) -> None:
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """``(N,)`` cosine similarities."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        img = self.model.encode_image(pixels).float()
        txt = self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float()
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1).cpu()
