"""Load the SD 1.5 components from a local diffusers folder (never a hub id) and save students.

``load_components`` returns the frozen VAE, text encoder, tokenizer, teacher UNet and noise schedule,
plus a trainable copy of the UNet as the student. ``save_student`` writes the student as a full
diffusers pipeline folder (with PeRFlow's scheduler) and as delta weights ``student - teacher``
(PeRFlow's release format), each to a temporary name first and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from marflow_core.atomic import atomic_open

from .inputs import check_pipeline_dir, pipeline_variant
from .tiny import CLIP_VOCAB_SIZE

DELTA_WEIGHTS = "delta_weights.safetensors"


@dataclass
class SDComponents:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    teacher: torch.nn.Module
    student: torch.nn.Module
    alphas_cumprod: torch.Tensor  # (1000,) float64
    scheduler_config: dict


def load_components(model_dir: str | Path, device: torch.device, weight_dtype: torch.dtype) -> SDComponents:
    """The components of ``model_dir`` (checked first); frozen parts in ``weight_dtype`` on ``device``,
    the student in float32 (mixed precision autocasts it); fp16-variant files load with
    ``variant="fp16"``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_pipeline_dir(model_dir)
    kw = {"local_files_only": True}
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    kw["variant"] = pipeline_variant(path)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{path / 'tokenizer'}: tokenizer has {len(tokenizer)} tokens, expected "
                           f"{CLIP_VOCAB_SIZE} (a broken CLIP tokenizer; is HF_HUB_OFFLINE=1 set?)")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
    teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    student = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    for module in (vae, text_encoder, teacher):
        module.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    student.train().to(device, dtype=torch.float32)
    alphas = sched.alphas_cumprod.to(torch.float64)
    return SDComponents(vae, text_encoder, tokenizer, teacher, student, alphas, dict(sched.config))


def load_sd_pipeline(path: str | Path, dtype: torch.dtype | None = None):
    """``StableDiffusionPipeline`` of a local folder (no safety checker, never a hub download).

    A folder saved with PeRFlow's scheduler gets it from ``replication.sd15.scheduler`` whatever
    module its ``model_index.json`` records (folders saved before the scheduler moved out of
    ``marflow_core`` name ``marflow_core.scheduler``). A folder with fp16-variant weight files is
    loaded with ``variant="fp16"`` (``inputs.pipeline_variant``)."""
    from diffusers import StableDiffusionPipeline

    kw = {"safety_checker": None, "requires_safety_checker": False, "local_files_only": True,
          "variant": pipeline_variant(path)}
    if dtype is not None:
        kw["dtype"] = dtype
    sched = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
    if sched.get("_class_name") != "PeRFlowScheduler":
        return StableDiffusionPipeline.from_pretrained(path, **kw)
    from .scheduler import PeRFlowScheduler

    pipe = StableDiffusionPipeline.from_pretrained(path, scheduler=None, **kw)  # None: not resolved
    pipe.scheduler = PeRFlowScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return pipe


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` onto ``final`` (the old one, if any, is removed after)."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_student(student: torch.nn.Module, model_dir: str | Path, out_dir: Path, scheduler,
                 delta_weights: bool) -> Path:
    """Write ``out_dir/pipeline/`` (teacher's VAE, text encoder, tokenizer + the student UNet + the
    PeRFlow ``scheduler``) and ``out_dir/delta_weights.safetensors``; returns the pipeline folder."""
    from safetensors.torch import save

    base = load_sd_pipeline(model_dir)
    teacher_state = {k: v.detach().float().cpu().clone() for k, v in base.unet.state_dict().items()}
    base.unet.load_state_dict(student.state_dict())
    base.scheduler = scheduler
    final = out_dir / "pipeline"
    tmp = out_dir / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(tmp)
    _replace_dir(tmp, final)
    if delta_weights:
        student_state = student.state_dict()
        delta = {k: (student_state[k].detach().float().cpu() - v).contiguous() for k, v in teacher_state.items()}
        with atomic_open(out_dir / DELTA_WEIGHTS, "wb") as fh:
            fh.write(save(delta))
    return final


def load_delta_weights(path: str | Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """PeRFlow-style delta weights as a state dict: a ``.safetensors`` file (marflow's
    ``delta_weights.safetensors``), or a folder in diffusers' UNet layout loaded as PeRFlow's README
    does (``UNet2DConditionModel.from_pretrained(path, variant=...)``, local files only)."""
    path = Path(path)
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, variant=variant, local_files_only=True)
    return {k: v.detach() for k, v in unet.state_dict().items()}


def merge_delta_weights(unet: torch.nn.Module, path: str | Path, variant: str | None = None) -> None:
    """Add PeRFlow-style delta weights (``load_delta_weights``; same keys as ``unet``) to ``unet`` in
    place, in float32: ``W = W_SD + dW``."""
    delta = load_delta_weights(path, variant)
    state = unet.state_dict()
    if set(delta) != set(state):
        missing = sorted(set(state) - set(delta))[:3]
        extra = sorted(set(delta) - set(state))[:3]
        raise ValueError(f"{path}: delta weights do not match the UNet (missing e.g. {missing}, extra e.g. {extra})")
    unet.load_state_dict({k: (v.float() + delta[k].to(v.device).float()).to(v.dtype) for k, v in state.items()})
