"""Sampling throughput with the evaluator's own code (``evaluate.load_pipeline`` and
``evaluate.generate``, PNG writing included): the student's PeRFlow scheduler at 4 and 8 steps and
the teacher's 25-step DPM-Solver, on the random pipeline (the cost of a UNet pass does not depend on
its weights). One warm-up batch is generated and not timed."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..coco import CocoPrompt
from ..config import ModelSpec, SD15EvalConfig
from ..inputs import read_caption_folder
from .device import describe, is_oom, peak_mb, release, reset_peak
from .plan import SmokePlan
from .report import GenerationCase
from .training import Inputs


def eval_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The evaluator's rule: fp16 / bf16 weights, float32 for ``no`` and for fp16 on CPU."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    return torch.float32 if device.type == "cpu" and dtype == torch.float16 else dtype


def prompts(data_dir, n: int) -> list[CocoPrompt]:
    """``n`` prompts cycling through the caption folder's captions."""
    pairs = read_caption_folder(data_dir)
    return [CocoPrompt(i, pairs[i % len(pairs)][0].name, pairs[i % len(pairs)][1]) for i in range(n)]


def run_generation(plan: SmokePlan, eval_section: dict, resolution: int, windows: int, target: str,
                   inputs: Inputs, device: torch.device, device_label: str, torch_version: str,
                   log: Callable[[str], None] = print) -> list[GenerationCase]:
    """One entry per (model, steps) of ``plan.generation``; never raises."""
    from ..evaluate import load_pipeline

    g = plan.generation
    dtype = eval_dtype(eval_section["mixed_precision"], device)
    n_timed = g.batch_size * g.timed_batches
    todo = prompts(inputs.data_dir, g.batch_size + n_timed)
    entries = []
    for name, model in g.models.items():
        spec = ModelSpec(path=str(inputs.model_dir), scheduler=model.scheduler, steps=model.steps,
                         guidance=[model.guidance], delta_weights=None, perflow_windows=windows,
                         perflow_prediction_type=target)
        cfg = SD15EvalConfig(coco_dir=str(inputs.data_dir), output_dir=str(inputs.work_dir / "generation"),
                             models={name: spec}, n_prompts=max(2, len(todo)), resolution=resolution, seed=0,
                             batch_size=g.batch_size, mixed_precision=eval_section["mixed_precision"])
        pipe, load_error = None, None
        try:
            pipe = load_pipeline(spec, device, dtype)
        except Exception as err:  # noqa: BLE001 (recorded)
            load_error = err
        for steps in model.steps:
            passes = steps * (2 if model.guidance > 1 else 1)
            entry = GenerationCase(device=device_label, torch=torch_version, wall_s=0.0, status="ok", model=name,
                                   scheduler=model.scheduler, steps=steps, guidance=model.guidance,
                                   dtype=str(dtype).removeprefix("torch."), batch_size=g.batch_size,
                                   n_images=n_timed, unet_passes_per_image=passes)
            tic = time.perf_counter()
            if pipe is None:
                entry.status = "oom" if is_oom(load_error) else "error"
                entry.reason = f"loading the pipeline: {describe(load_error)}"
            else:
                _time_one(pipe, todo, steps, model.guidance, cfg, inputs, name, device, entry)
            entry.wall_s = time.perf_counter() - tic
            log(f"[gpu_smoke] generation {name} {steps} steps: {entry.status}"
                + (f", {entry.images_per_s:.2f} images/s" if entry.images_per_s else "")
                + (f" ({entry.reason})" if entry.reason else ""))
            entries.append(entry)
        del pipe
        release(device)
    return entries


def _time_one(pipe, todo: list[CocoPrompt], steps: int, guidance: float, cfg: SD15EvalConfig, inputs: Inputs,
              name: str, device: torch.device, entry: GenerationCase) -> None:
    from ..evaluate import generate

    folder = inputs.work_dir / "generation" / name
    try:
        generate(pipe, todo[:cfg.batch_size], steps, guidance, cfg, folder / f"warmup_{steps}", device, False)
        reset_peak(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        generate(pipe, todo[cfg.batch_size:], steps, guidance, cfg, folder / f"steps_{steps}", device, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
        entry.sec_per_image = seconds / entry.n_images
        entry.images_per_s = entry.n_images / seconds
        entry.peak_memory_mb = peak_mb(device)
    except Exception as err:  # noqa: BLE001 (recorded)
        entry.status = "oom" if is_oom(err) else "error"
        entry.reason = describe(err)
