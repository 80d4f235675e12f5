"""The device side of a smoke run: its name, out-of-memory errors, peak memory, clean-up between
cases, and which pass precisions it runs."""

from __future__ import annotations

import gc
import platform
from pathlib import Path

import torch

from .report import Environment

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_device() -> torch.device:
    """The device accelerate's trainer would pick: the first GPU, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, else the CPU model of ``/proc/cpuinfo``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    return f"CPU: {platform.processor() or platform.machine()}"


def environment(device: torch.device) -> Environment:
    import accelerate
    import diffusers
    import transformers

    return Environment(device=device_name(device), device_type=device.type, torch=torch.__version__,
                       cuda=torch.version.cuda, diffusers=diffusers.__version__,
                       accelerate=accelerate.__version__, transformers=transformers.__version__,
                       cpu_threads=torch.get_num_threads())


#: what an allocation failure says on CUDA and on CPU (``DefaultCPUAllocator``)
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``torch.cuda.OutOfMemoryError``, ``MemoryError`` or
    a ``RuntimeError`` whose message is the CUDA or CPU allocator's (e.g. cuDNN's)."""
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MESSAGES)


def describe(err: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:limit]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_mb(device: torch.device) -> float | None:
    """CUDA memory allocated now (None on CPU)."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def peak_memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss"


def peak_mb(device: torch.device) -> float:
    from ..train import peak_memory_mb

    return peak_memory_mb(device)


def release(device: torch.device) -> None:
    """Free what a finished (or failed) case held, and accelerate's process-wide state, so the next
    case builds its own ``Accelerator`` (with another mixed precision) from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def precision_unsupported(device: torch.device, precision: str) -> str | None:
    """Why passes in ``precision`` (``fp32`` | ``fp16`` | ``bf16``, or a trainer's ``no``) cannot run
    on ``device``, or None: a CUDA device without bf16, or an op that fails on a small convolution +
    matmul under autocast."""
    if precision in ("no", "fp32"):
        return None
    dtype = DTYPES[precision]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"{device_name(device)} has no bf16 support (torch.cuda.is_bf16_supported() is False)"
    try:
        conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(device)
        lin = torch.nn.Linear(4, 4).to(device)
        x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
        with torch.autocast(device_type=device.type, dtype=dtype):
            y = lin(conv(x).permute(0, 2, 3, 1)).sum()
        y.backward()
    except (RuntimeError, NotImplementedError) as err:
        return f"{precision} passes fail on {device_name(device)}: {describe(err)}"
    return None


def trainer_precision_unsupported(device: torch.device, precision: str) -> str | None:
    """``precision_unsupported``, and for the trainer's ``fp16`` / ``bf16`` also accelerate's own
    rule: its ``Accelerator`` must run native autocast there (``native_amp``; accelerate runs none
    for fp16 on CPU, where the trainer's fp16 frozen models would meet the float32 student)."""
    why = precision_unsupported(device, precision)
    if why is not None or precision == "no":
        return why
    from accelerate import Accelerator

    try:
        native = Accelerator(mixed_precision=precision, cpu=device.type == "cpu").native_amp
    except ValueError as err:
        return f"accelerate refuses mixed_precision = {precision!r} here: {describe(err)}"
    finally:
        release(device)
    if not native:
        return (f"accelerate runs no {precision} autocast on {device.type} (Accelerator.native_amp is False), "
                f"so the trainer's {precision} frozen models cannot meet its float32 student")
    return None
