"""The one training loop of the GPU tiers (SD 1.5 and CIFAR-10) on accelerate: one CPU process up to
many GPUs and nodes (``accelerate launch``), mixed precision, gradient accumulation, resumable
checkpoints, an EMA of the weights, and the step cost in the log.

A tier builds the model, its EMA and optimizer, then

    model, optimizer, state = prepare(accelerator, model, optimizer, ema, out)   # resumes
    ... its data, positioned at ``state.step`` ...
    last = train_loop(accelerator, model, optimizer, ema, state, settings, out, micro_loss, progress)

where ``micro_loss(step, micro) -> (loss, parts)`` computes the loss of micro-batch ``micro`` of
optimizer step ``step`` on this process (``parts``: floats to log). The tier draws every sample's
randomness from its global position (``replication.gpu_common.batches``), so a global batch split over
more processes or accumulation micro-steps is the same computation.

Under ``out``: ``checkpoints/checkpoint-<step>/`` (accelerate ``save_state``: model, optimizer, EMA,
RNG states, step; written into a temporary folder and renamed once complete; the newest
``checkpoints_total_limit`` are kept) and ``train_log.jsonl``: per logged step the process-averaged
loss terms, ``grad_norm`` (null on an fp16 overflow skip), ``overflow_skips`` so far,
``sec_per_step`` (the mean over the steps since the previous row, logging and checkpoints excluded)
and ``peak_memory_mb``. A resume drops log rows after the resumed step (written after the last
checkpoint, they are recomputed).

Under ``mixed_precision: fp16`` accelerate's GradScaler skips the optimizer step of an overflowed
gradient and lowers its scale; ``max_overflow_skips`` consecutive skips stop the run. The EMA is
updated after every optimizer step that was taken (not after a skipped one).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from marflow_core.atomic import atomic_torch_save, atomic_write_text
from marflow_core.errors import NonFiniteLossError

CKPT = re.compile(r"checkpoint-(\d+)$")
LOG = "train_log.jsonl"
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")

#: ``(step, micro) -> (loss, parts)``: the loss of one micro-batch on this process
MicroLoss = Callable[[int, int], tuple[torch.Tensor, dict[str, float]]]


class TrainState:
    """The step counter, checkpointed with accelerate's ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclass
class LoopSettings:
    """What the loop needs of a tier's config: ``steps`` optimizer steps of ``grad_accum``
    micro-batches each at learning rate ``lr_at(step)``; gradient-norm clipping at ``grad_clip``
    (<= 0: measured only); a loss term above ``loss_limit`` in magnitude stops the run; a log row every
    ``log_every`` steps, a checkpoint every ``checkpoint_every`` (and at the end), the newest
    ``checkpoints_total_limit`` kept (None: all); ``max_overflow_skips`` consecutive fp16 skips stop
    the run; ``debug_dump``: a file for step 0's averaged loss terms and gradient (tests)."""

    steps: int
    lr_at: Callable[[int], float]
    grad_accum: int = 1
    grad_clip: float = 1.0
    loss_limit: float = 1e8
    log_every: int = 10
    checkpoint_every: int = 1000
    checkpoints_total_limit: int | None = None
    max_overflow_skips: int = 20
    debug_dump: str | None = None
    desc: str = "train"
    save_checkpoints: bool = True  # False: none at all (runs that are only timed, replication.sd15.gpu_smoke)


def make_accelerator(mixed_precision: str, grad_accum: int, out: Path, cpu: bool = False):
    """An ``accelerate.Accelerator`` for a run writing under ``out`` (``cpu``: stay on the CPU)."""
    from accelerate import Accelerator  # looked up at call time (tests replace it)
    from accelerate.utils import ProjectConfiguration

    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                       project_config=ProjectConfiguration(project_dir=str(out)))


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen networks under the accelerator's mixed precision (float32 without)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``out/checkpoints/checkpoint-<step>`` folder, or None."""
    found = [(int(m.group(1)), p) for p in (Path(out) / "checkpoints").glob("checkpoint-*")
             if (m := CKPT.search(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save_checkpoint(accelerator, out: Path, step: int, limit: int | None) -> None:
    """``save_state`` into a temporary folder, renamed to ``checkpoint-<step>`` once complete; then
    only the newest ``limit`` checkpoints are kept."""
    ckpts = Path(out) / "checkpoints"
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


def tf32_flags() -> tuple[bool, bool]:
    """``(matmul, cudnn)`` TF32 flags of the CUDA backends (settable, and read, on any machine)."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@contextmanager
def tf32_set(flags: tuple[bool, bool]) -> Iterator[None]:
    """Run with the TF32 ``flags``; the previous ones are restored after."""
    before = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def checkpoint_keeping_precision(module, *args, **kwargs):
    """``torch.utils.checkpoint`` of ``module`` whose recompute (in the backward pass) runs under the
    TF32 flags of its forward. ``float32_passes`` turns TF32 off for the finite-difference passes and
    is left before the backward, so the default checkpoint would recompute them with TF32 on (torch
    keeps the autocast state and the RNG itself, not these global flags)."""
    flags = tf32_flags()
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), tf32_set(flags)), **kwargs)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing of a diffusers model with ``checkpoint_keeping_precision``."""
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_precision)


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


@contextmanager
def averaged_weights(ema, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` holding the EMA weights inside (its own weights restored after); ``ema`` None:
    ``module`` as it is."""
    if ema is None:
        yield module
        return
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield module
    finally:
        ema.restore(module.parameters())


def prepare(accelerator, model: torch.nn.Module, optimizer, ema, out: Path):
    """``accelerator.prepare`` the model and optimizer, register the step counter and ``ema`` for
    checkpointing, and resume from the newest checkpoint under ``out`` (the EMA moved back to the
    accelerator's device: accelerate reloads registered objects on the CPU, and diffusers'
    ``EMAModel.load_state_dict`` keeps them there). Returns ``(model, optimizer, state)``."""
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    resume = latest_checkpoint(out)
    if resume is not None:
        accelerator.load_state(str(resume))
        if ema is not None:
            ema.to(device=accelerator.device)
        accelerator.print(f"resumed from {resume} at step {state.step}")
    if accelerator.is_main_process:
        _trim_log(Path(out) / LOG, state.step)
    accelerator.wait_for_everyone()
    return model, optimizer, state


def _trim_log(path: Path, step: int) -> None:
    """Drop the rows of ``path`` logged after ``step`` (a run that stopped after its last checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text("".join(f"{line}\n" for line in kept), path)


def _row_step(line: str) -> float:
    """The step of a log row; infinite for a line that is not one (a write cut short by a kill)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def train_loop(accelerator, model: torch.nn.Module, optimizer, ema, state: TrainState, settings: LoopSettings,
               out: Path, micro_loss: MicroLoss, progress: bool = True) -> dict[str, Any]:
    """Train from ``state.step`` to ``settings.steps`` (see the module docstring); returns the last
    step's process-averaged loss terms with its ``step`` (empty when nothing was left to do)."""
    from tqdm.auto import tqdm

    out = Path(out)
    max_norm = settings.grad_clip if settings.grad_clip > 0 else float("inf")
    skips = OverflowSkips(settings.max_overflow_skips if accelerator.mixed_precision == "fp16" else 1)
    bar = tqdm(total=settings.steps, initial=state.step,
               disable=not (progress and accelerator.is_local_main_process), desc=settings.desc)
    step_seconds, timed_steps, last = 0.0, 0, {}
    while state.step < settings.steps:
        tic = time.perf_counter()
        step = state.step
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        skipped = False
        for micro in range(settings.grad_accum):
            with accelerator.accumulate(model):
                loss, parts = micro_loss(step, micro)
                if not all(math.isfinite(v) for v in parts.values()):
                    raise NonFiniteLossError(f"step {step}: non-finite loss terms {parts}")
                exploded = {k: v for k, v in parts.items() if abs(v) > settings.loss_limit}
                if exploded:
                    raise NonFiniteLossError(f"step {step}: loss exploded: {exploded} exceeds loss_limit "
                                             f"{settings.loss_limit:g}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if settings.debug_dump and step == 0:
                        dump_step(accelerator, model, parts, Path(settings.debug_dump))
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                    if not math.isfinite(grad_norm) and accelerator.scaler is None:  # no GradScaler to skip it
                        raise NonFiniteLossError(f"step {step}: non-finite gradient norm {grad_norm}")
                optimizer.step()  # under fp16 the GradScaler skips an overflowed step and lowers its scale
                if accelerator.sync_gradients:
                    skipped = accelerator.optimizer_step_was_skipped
                    skips.update(step, grad_norm, skipped)
                optimizer.zero_grad(set_to_none=True)
        if ema is not None and not skipped:
            ema.step(accelerator.unwrap_model(model).parameters())
        state.step += 1
        step_seconds, timed_steps = step_seconds + time.perf_counter() - tic, timed_steps + 1
        mean_parts = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                      for k, v in parts.items()}
        last = {"step": state.step, **mean_parts}
        bar.update(1)
        bar.set_postfix(**{k: f"{v:.4g}" for k, v in mean_parts.items()})
        if accelerator.is_main_process and (state.step % settings.log_every == 0 or state.step == settings.steps):
            row = {"step": state.step, **mean_parts, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                   "overflow_skips": skips.total, "sec_per_step": step_seconds / timed_steps,
                   "peak_memory_mb": peak_memory_mb(accelerator.device)}
            with open(out / LOG, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            step_seconds, timed_steps = 0.0, 0
        if settings.save_checkpoints and (state.step % settings.checkpoint_every == 0 or state.step == settings.steps):
            save_checkpoint(accelerator, out, state.step, settings.checkpoints_total_limit)
    bar.close()
    accelerator.wait_for_everyone()
    return last


def dump_step(accelerator, model: torch.nn.Module, parts: dict[str, float], path: Path) -> None:
    """Step 0's process-averaged loss terms, gradient norm and flattened (synchronised) gradient."""
    flat = torch.cat([p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in accelerator.unwrap_model(model).parameters()]).cpu()
    mean_parts = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                  for k, v in parts.items()}
    if accelerator.is_main_process:
        atomic_torch_save({"parts": mean_parts, "grad": flat, "grad_norm": float(flat.norm()),
                           "processes": accelerator.num_processes}, path)
