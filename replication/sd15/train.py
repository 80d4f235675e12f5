"""SD 1.5 trainer: PeRFlow and PeRFlow + MA on the GPU tiers' accelerate loop
(``replication.gpu_common.accelerate_train``; one CPU process up to many GPUs and nodes).

    python -m replication.stage sd15_train [--params FILE]
    accelerate launch [--multi_gpu --num_processes 8 ...] -m replication.stage sd15_train

The stages ``sd15_train`` and ``sd15_train_perflow`` (``stages.py``) call ``run_stage`` with their
section, an ``SD15TrainConfig`` (replication/sd15/config.py). Inputs are checked before any model is
loaded or anything is written: a bad key, a missing weights file or caption folder is one line on
stderr and exit status 2. Outputs under ``output_dir``: ``checkpoints/checkpoint-<step>/``
(accelerate ``save_state``: student, optimizer, EMA, RNG, step; the newest is resumed automatically;
with ``delete_checkpoints_when_done`` they are deleted once the run is finished, which
``finished.json`` records, so that a finished run is not trained again),
``pipeline/`` (a diffusers pipeline folder with the student UNet, EMA weights if ``ema``, and the
PeRFlow scheduler), ``delta_weights.safetensors``, ``train_log.jsonl`` (per logged step: the loss
terms, the gradient norm, null on an fp16 overflow skip, ``overflow_skips`` so far, ``sec_per_step``
averaged over the steps since the previous row, logging and checkpoints excluded, and
``peak_memory_mb``) and ``config.yaml``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from marflow_core.atomic import atomic_write_text

from ..config import ConfigError
from ..gpu_common.accelerate_train import (  # the loop's pieces, also importable from here as before
    LoopSettings,
    OverflowSkips,
    TrainState,
    averaged_weights,
    checkpoint_keeping_precision,
    enable_checkpointing,
    float32_passes,
    latest_checkpoint,
    make_accelerator,
    peak_memory_mb,
    prepare,
    save_checkpoint,
    tf32_flags,
    tf32_set,
    train_loop,
    weight_dtype,
)
from .config import SD15TrainConfig
from .inputs import check_pipeline_dir, checked_inputs, read_caption_folder

__all__ = ["RESUMABLE_KEYS", "OverflowSkips", "TrainState", "check_inputs", "checkpoint_keeping_precision",
           "enable_checkpointing", "float32_passes", "latest_checkpoint", "ma_context", "peak_memory_mb",
           "run_stage", "save_checkpoint", "tf32_flags", "tf32_set", "train"]

#: config keys that may change when a run resumes (they do not change what is computed)
RESUMABLE_KEYS = ("steps", "debug_dump", "log_every", "checkpoint_every", "checkpoints_total_limit",
                  "dataloader_workers", "loss_limit", "max_overflow_skips", "delete_checkpoints_when_done")
#: written into ``output_dir`` once the final pipeline is saved: ``{"steps": N}``
FINISHED = "finished.json"


def check_inputs(cfg: SD15TrainConfig) -> None:
    """Every input exists and is laid out as documented; raises ``ConfigError`` naming it."""
    check_pipeline_dir(cfg.model_dir, "model_dir")
    read_caption_folder(cfg.data_dir, "data_dir")
    out = Path(cfg.output_dir)
    finished = finished_without_checkpoints(out)
    if finished is not None and finished != cfg.steps:
        raise ConfigError(f"steps = {cfg.steps}: output_dir {str(out)!r} holds a run finished at step {finished} "
                          f"whose checkpoints were deleted (delete_checkpoints_when_done), so it cannot be resumed; "
                          f"use another output_dir, or delete this one to start over")
    saved = out / "config.yaml"
    if saved.is_file():
        old = _leaves(yaml.safe_load(saved.read_text()) or {})
        new = _leaves(json.loads(json.dumps(asdict(cfg))))
        missing = object()
        for key in sorted(set(old) | set(new)):
            if key.split(".")[0] not in RESUMABLE_KEYS and old.get(key, missing) != new.get(key, missing):
                raise ConfigError(f"{key} = {new.get(key)!r}: output_dir {str(out)!r} holds a run with "
                                  f"{key} = {old.get(key)!r}; use another output_dir or delete it to start over")


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every non-mapping value of a nested mapping."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finished_without_checkpoints(out: Path) -> int | None:
    """The step count of a finished run in ``out`` whose checkpoints are gone (``FINISHED`` written,
    no checkpoint left), else None."""
    marker = out / FINISHED
    if not marker.is_file() or latest_checkpoint(out) is not None:
        return None
    return int(json.loads(marker.read_text())["steps"])


def perflow_scheduler(cfg: SD15TrainConfig, scheduler_config: dict):
    """PeRFlow's scheduler for the saved student (replication.sd15.scheduler), from the teacher's betas."""
    from .scheduler import perflow_scheduler_from

    return perflow_scheduler_from(scheduler_config, cfg.perflow.target, cfg.student.windows)


def ma_context(accelerator, cfg: SD15TrainConfig, model: torch.nn.Module):
    """``float32_passes`` of ``model`` for the finite-difference MA passes when ``ma_fd_fp32`` under
    mixed precision, else None."""
    if cfg.ma_fd_fp32_active() and accelerator.mixed_precision != "no":
        return float32_passes(accelerator, model)
    return None


def run_stage(configs: dict[str, SD15TrainConfig], progress: bool) -> dict[str, Any]:
    """The ``sd15_train`` / ``sd15_train_perflow`` stage: check the inputs, then train (resuming)."""
    ((section, cfg),) = configs.items()
    checked_inputs(section, check_inputs, cfg)
    pipeline = train(cfg, progress)
    return {"pipeline": str(pipeline), "steps": cfg.steps}


def settings(cfg: SD15TrainConfig, save: bool = True) -> LoopSettings:
    """The shared loop's settings of this config (``save=False``: no checkpoints)."""
    return LoopSettings(steps=cfg.steps, lr_at=cfg.lr_at, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                        loss_limit=cfg.loss_limit, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                        checkpoints_total_limit=cfg.checkpoints_total_limit,
                        max_overflow_skips=cfg.max_overflow_skips, debug_dump=cfg.debug_dump, desc="sd15 train",
                        save_checkpoints=save)


def train(cfg: SD15TrainConfig, progress: bool = True, save: bool = True) -> Path:
    """Run (or resume) training; returns the saved pipeline folder.

    ``save=False`` writes no checkpoint and no pipeline (only ``config.yaml`` and the log): the
    step-cost measurements of ``replication.sd15.gpu_smoke``, whose runs are thrown away."""
    from .batches import PlannedBatches, sd15_plan
    from .components import load_components, save_student
    from .data import CaptionFolder
    from .objective import PeRFlowSD15Objective, conditioning, draw_sample_noise

    out = Path(cfg.output_dir)
    if finished_without_checkpoints(out) == cfg.steps and (out / "pipeline").is_dir():
        print(f"{out}: finished at step {cfg.steps} (checkpoints deleted); nothing to train")
        return out / "pipeline"
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum, out)
    dtype = weight_dtype(accelerator)
    comps = load_components(cfg.model_dir, accelerator.device, dtype)
    student = comps.student
    ma = cfg.student_ma()
    if ma is not None and ma.divergence == "hutchinson":
        from diffusers.models.attention_processor import AttnProcessor

        student.set_attn_processor(AttnProcessor())  # fused attention kernels have no double backward
    if cfg.gradient_checkpointing:
        enable_checkpointing(student)
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, model_cls=type(student),
                       model_config=student.config)
        ema.to(accelerator.device)
    optimizer = cfg.make_optimizer(student.parameters())
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(json.loads(json.dumps(asdict(cfg))), sort_keys=False), out / "config.yaml")
    student, optimizer, state = prepare(accelerator, student, optimizer, ema, out)

    dataset = CaptionFolder(cfg.data_dir, comps.tokenizer, cfg.resolution, cfg.center_crop, cfg.random_flip)
    plan = sd15_plan(len(dataset), cfg.batch_size, accelerator.num_processes, cfg.grad_accum, cfg.student.seeds[0])
    loader = torch.utils.data.DataLoader(
        PlannedBatches(dataset, plan, accelerator.process_index, state.step, cfg.steps),
        batch_size=None, num_workers=cfg.dataloader_workers)
    objective = PeRFlowSD15Objective(comps.teacher, comps.alphas_cumprod.to(accelerator.device),
                                     cfg.perflow, cfg.student.windows, ma, cfg.ma_fd_fp32_active())
    with torch.no_grad():
        null_ids = comps.tokenizer("", max_length=comps.tokenizer.model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
        null_text = comps.text_encoder(null_ids)[0]
    latent_channels = comps.vae.config.latent_channels
    down = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    latent_shape = (latent_channels, cfg.resolution // down, cfg.resolution // down)
    scaling = comps.vae.config.scaling_factor
    batches = iter(loader)

    def micro_loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        run_ma = ma is not None and step % ma.every == 0
        batch = next(batches)
        assert int(batch["step"]) == step
        noise = draw_sample_noise(plan.generators(step, batch["positions"].tolist()), latent_shape,
                                  cfg.perflow.cfg_drop, ma.n_probes if ma is not None else 0,
                                  ma.probe_kind if run_ma else None)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(accelerator.device, dtype)
            dist = comps.vae.encode(pixels).latent_dist
            latents = (dist.mean + dist.std * noise.vae.to(dist.mean)) * scaling
            text = comps.text_encoder(batch["input_ids"].to(accelerator.device))[0]
        cond = conditioning(text, null_text.expand_as(text), noise.keep_text, cfg.perflow)
        with accelerator.autocast():
            return objective(student, latents, noise, cond, run_ma, ma_context(accelerator, cfg, student))

    train_loop(accelerator, student, optimizer, ema, state, settings(cfg, save), out, micro_loss, progress)

    final = out / "pipeline"
    if save and accelerator.is_main_process:
        with averaged_weights(ema, accelerator.unwrap_model(student)) as unet:
            final = save_student(unet, cfg.model_dir, out, perflow_scheduler(cfg, comps.scheduler_config),
                                 cfg.save_delta_weights)
        atomic_write_text(json.dumps({"steps": cfg.steps}) + "\n", out / FINISHED)
        if cfg.delete_checkpoints_when_done:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
