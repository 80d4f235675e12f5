"""SD 1.5 trainer: PeRFlow and PeRFlow + MA with accelerate (one CPU process up to many GPUs and nodes).

    python -m replication.stage sd15_train [--params FILE]
    accelerate launch [--multi_gpu --num_processes 8 ...] -m replication.stage sd15_train

The stages ``sd15_train`` and ``sd15_train_perflow`` (``stages.py``) call ``run_stage`` with their
section, an ``SD15TrainConfig`` (replication/sd15/config.py). Inputs are checked before any model is
loaded or anything is written: a bad key, a missing weights file or caption folder is one line on
stderr and exit status 2. Outputs under ``output_dir``: ``checkpoints/checkpoint-<step>/``
(accelerate ``save_state``: student, optimizer, EMA, RNG, step; the newest is resumed automatically),
``pipeline/`` (a diffusers pipeline folder with the student UNet, EMA weights if ``ema``, and the
PeRFlow scheduler), ``delta_weights.safetensors``, ``train_log.jsonl`` (per logged step: the loss
terms, the gradient norm, null on an fp16 overflow skip, ``overflow_skips`` so far, ``sec_per_step``
averaged over the steps since the previous row, logging and checkpoints excluded, and
``peak_memory_mb``) and ``config.yaml``.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from marflow_core.atomic import atomic_torch_save, atomic_write_text
from marflow_core.errors import NonFiniteLossError

from ..config import ConfigError
from .config import SD15TrainConfig
from .inputs import check_pipeline_dir, checked_inputs, read_caption_folder

#: config keys that may change when a run resumes (they do not change what is computed)
RESUMABLE_KEYS = ("steps", "debug_dump", "log_every", "checkpoint_every", "checkpoints_total_limit",
                  "dataloader_workers", "loss_limit", "max_overflow_skips")
CKPT = re.compile(r"checkpoint-(\d+)$")


class TrainState:
    """The step counter and log history, checkpointed with accelerate's ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def check_inputs(cfg: SD15TrainConfig) -> None:
    """Every input exists and is laid out as documented; raises ``ConfigError`` naming it."""
    check_pipeline_dir(cfg.model_dir, "model_dir")
    read_caption_folder(cfg.data_dir, "data_dir")
    out = Path(cfg.output_dir)
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


def latest_checkpoint(out: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in (out / "checkpoints").glob("checkpoint-*")
             if (m := CKPT.search(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save_checkpoint(accelerator, out: Path, step: int, limit: int | None) -> None:
    """``save_state`` into a temporary folder, renamed to ``checkpoint-<step>`` once complete."""
    ckpts = out / "checkpoints"
    tmp, final = ckpts / f".checkpoint-{step}.tmp", ckpts / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if limit is not None:
            old = sorted((int(CKPT.search(p.name).group(1)), p) for p in ckpts.glob("checkpoint-*"))
            for _, path in old[:-limit]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def perflow_scheduler(cfg: SD15TrainConfig, scheduler_config: dict):
    """PeRFlow's scheduler for the saved student (replication.sd15.scheduler), from the teacher's betas."""
    from .scheduler import perflow_scheduler_from

    return perflow_scheduler_from(scheduler_config, cfg.perflow.target, cfg.student.windows)


@contextmanager
def float32_passes(accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Passes of the prepared ``model`` in float32: autocast off, TF32 off for matmuls and
    convolutions, and the model's own forward in place of accelerate's, which opens its own
    autocast inside (an outer ``autocast(enabled=False)`` does not reach it). All restored after."""
    inner = accelerator.unwrap_model(model)
    original = inner.__dict__.get("_original_forward")  # set by accelerate's prepare under native amp
    wrapped = inner.__dict__.get("forward")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if original is not None:
            inner.forward = original
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device_type=accelerator.device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        if original is not None:
            if wrapped is None:
                del inner.forward
            else:
                inner.forward = wrapped


def ma_context(accelerator, cfg: SD15TrainConfig, model: torch.nn.Module):
    """``float32_passes`` of ``model`` for the finite-difference MA passes when ``ma_fd_fp32`` under
    mixed precision, else None."""
    if cfg.ma_fd_fp32_active() and accelerator.mixed_precision != "no":
        return float32_passes(accelerator, model)
    return None


class OverflowSkips:
    """Consecutive optimizer steps skipped for a non-finite gradient norm.

    Under fp16, accelerate's GradScaler skips the step of an overflowed gradient and lowers its
    scale; ``limit`` consecutive skips stop the run. A non-finite norm whose step was not skipped
    (no GradScaler: ``no`` / ``bf16``) stops it at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update(self, step: int, grad_norm: float, skipped: bool) -> None:
        if math.isfinite(grad_norm):
            self.consecutive = 0
            return
        if not skipped:
            raise NonFiniteLossError(f"step {step}: non-finite gradient norm {grad_norm}")
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise NonFiniteLossError(f"step {step}: {self.consecutive} consecutive fp16 overflow skips "
                                     f"(non-finite gradient norm; max_overflow_skips = {self.limit})")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def run_stage(configs: dict[str, SD15TrainConfig], progress: bool) -> dict[str, Any]:
    """The ``sd15_train`` / ``sd15_train_perflow`` stage: check the inputs, then train (resuming)."""
    ((section, cfg),) = configs.items()
    checked_inputs(section, check_inputs, cfg)
    pipeline = train(cfg, progress)
    return {"pipeline": str(pipeline), "steps": cfg.steps}


def train(cfg: SD15TrainConfig, progress: bool = True, save: bool = True) -> Path:
    """Run (or resume) training; returns the saved pipeline folder.

    ``save=False`` writes no checkpoint and no pipeline (only ``config.yaml`` and the log): the
    step-cost measurements of ``replication.sd15.gpu_smoke``, whose runs are thrown away."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from .batches import BatchPlan, PlannedBatches
    from .components import load_components, save_student
    from .data import CaptionFolder
    from .objective import PeRFlowSD15Objective, conditioning, draw_sample_noise

    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              project_config=ProjectConfiguration(project_dir=str(out)))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    comps = load_components(cfg.model_dir, accelerator.device, weight_dtype)
    student = comps.student
    ma = cfg.student_ma()
    if ma is not None and ma.divergence == "hutchinson":
        from diffusers.models.attention_processor import AttnProcessor

        student.set_attn_processor(AttnProcessor())  # fused attention kernels have no double backward
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, model_cls=type(student),
                       model_config=student.config)
        ema.to(accelerator.device)
    optimizer = cfg.make_optimizer(student.parameters())
    student, optimizer = accelerator.prepare(student, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(json.loads(json.dumps(asdict(cfg))), sort_keys=False), out / "config.yaml")
    resume = latest_checkpoint(out)
    if resume is not None:
        accelerator.load_state(str(resume))
        if ema is not None:  # accelerate loads registered objects onto the CPU, and EMAModel keeps them there
            ema.to(device=accelerator.device)
        accelerator.print(f"resumed from {resume} at step {state.step}")

    dataset = CaptionFolder(cfg.data_dir, comps.tokenizer, cfg.resolution, cfg.center_crop, cfg.random_flip)
    plan = BatchPlan(len(dataset), cfg.batch_size, accelerator.num_processes, cfg.grad_accum,
                     cfg.student.seeds[0])
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
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    skips = OverflowSkips(cfg.max_overflow_skips if accelerator.mixed_precision == "fp16" else 1)

    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (progress and accelerator.is_local_main_process),
               desc="sd15 train")
    log_path = out / "train_log.jsonl"
    batches = iter(loader)
    step_seconds, timed_steps = 0.0, 0
    while state.step < cfg.steps:
        tic = time.perf_counter()
        step = state.step
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        run_ma = ma is not None and step % ma.every == 0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            assert int(batch["step"]) == step
            with accelerator.accumulate(student):
                noise = draw_sample_noise(plan.generators(step, batch["positions"].tolist()), latent_shape,
                                          cfg.perflow.cfg_drop, ma.n_probes if ma is not None else 0,
                                          ma.probe_kind if run_ma else None)
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(accelerator.device, weight_dtype)
                    dist = comps.vae.encode(pixels).latent_dist
                    latents = (dist.mean + dist.std * noise.vae.to(dist.mean)) * scaling
                    text = comps.text_encoder(batch["input_ids"].to(accelerator.device))[0]
                cond = conditioning(text, null_text.expand_as(text), noise.keep_text, cfg.perflow)
                with accelerator.autocast():
                    loss, parts = objective(student, latents, noise, cond, run_ma,
                                            ma_context(accelerator, cfg, student))
                if not all(math.isfinite(v) for v in parts.values()):
                    raise NonFiniteLossError(f"step {step}: non-finite loss terms {parts}")
                exploded = {k: v for k, v in parts.items() if abs(v) > cfg.loss_limit}
                if exploded:
                    raise NonFiniteLossError(f"step {step}: loss exploded: {exploded} exceeds loss_limit "
                                             f"{cfg.loss_limit:g}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if cfg.debug_dump and step == 0:
                        _dump_step(accelerator, student, loss, parts, Path(cfg.debug_dump))
                    grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), max_norm))
                    if not math.isfinite(grad_norm) and accelerator.scaler is None:  # no GradScaler to skip it
                        raise NonFiniteLossError(f"step {step}: non-finite gradient norm {grad_norm}")
                optimizer.step()  # under fp16 the GradScaler skips an overflowed step and lowers its scale
                if accelerator.sync_gradients:
                    skips.update(step, grad_norm, accelerator.optimizer_step_was_skipped)
                optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(student).parameters())
        state.step += 1
        step_seconds, timed_steps = step_seconds + time.perf_counter() - tic, timed_steps + 1
        mean_parts = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                      for k, v in parts.items()}
        bar.update(1)
        bar.set_postfix(**{k: f"{v:.4g}" for k, v in mean_parts.items()})
        if accelerator.is_main_process and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
            row = {"step": state.step, **mean_parts, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                   "overflow_skips": skips.total, "sec_per_step": step_seconds / timed_steps,
                   "peak_memory_mb": peak_memory_mb(accelerator.device)}
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            step_seconds, timed_steps = 0.0, 0
        if save and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps):
            save_checkpoint(accelerator, out, state.step, cfg.checkpoints_total_limit)
    bar.close()

    accelerator.wait_for_everyone()
    final = out / "pipeline"
    if save and accelerator.is_main_process:
        unet = accelerator.unwrap_model(student)
        if ema is not None:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
        final = save_student(unet, cfg.model_dir, out, perflow_scheduler(cfg, comps.scheduler_config),
                             cfg.save_delta_weights)
        if ema is not None:
            ema.restore(unet.parameters())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _dump_step(accelerator, student, loss: torch.Tensor, parts: dict[str, float], path: Path) -> None:
    """Step 1's process-averaged loss terms, gradient norm and flattened (synchronised) gradient."""
    flat = torch.cat([p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in accelerator.unwrap_model(student).parameters()]).cpu()
    mean_parts = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                  for k, v in parts.items()}
    if accelerator.is_main_process:
        atomic_torch_save({"parts": mean_parts, "grad": flat, "grad_norm": float(flat.norm()),
                           "processes": accelerator.num_processes}, path)
