"""The smoke run's JSON: dataclasses written atomically, read back with every key checked.

Every entry (a training case, the kill-and-resume check, a generation setting, a divergence case)
carries the ``device`` it ran on (``torch.cuda.get_device_name`` or the CPU model of
``/proc/cpuinfo``), the ``torch`` version and its ``wall_s``, and a ``status``: ``ok``, ``oom`` (out
of memory: recorded, and the run goes on), ``skipped`` (not run; ``reason`` says why), ``error``
(an exception; ``reason`` holds it) or ``failed`` (ran, but a check did not hold). The file is
rewritten after every entry with ``complete: false``, and once more with ``complete: true`` at the
end, so an interrupted run leaves a valid partial file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from marflow_core.atomic import atomic_write_text

from ...config import from_dict, require

SCHEMA_VERSION = 1
STATUSES: tuple[str, ...] = ("ok", "oom", "skipped", "error", "failed")


@dataclass(kw_only=True)
class Entry:
    """What every entry records."""

    device: str
    torch: str
    wall_s: float
    status: str
    reason: str | None = None

    def validate(self, where: str) -> None:
        require(self.status in STATUSES, f"{where}.status", self.status, f"one of {STATUSES}")


@dataclass(kw_only=True)
class TrainCase(Entry):
    """Seconds per step and peak memory of one training configuration at one batch size.

    ``sec_per_step``: mean over the ``timed_steps`` steps after ``warmup_steps`` (the trainer's own
    ``sec_per_step`` log field, data loading included, logging and checkpoints excluded);
    ``peak_memory_mb``: CUDA's peak allocated memory over the run (reset before it), or on CPU the
    process's peak resident set (``peak_memory_kind`` says which; on CPU it never decreases, so
    later cases inherit earlier peaks)."""

    name: str
    method: str                  # "perflow" | "perflow_ma"
    mixed_precision: str
    ma_fd_fp32: bool | None
    batch_size: int
    gradient_checkpointing: bool
    oom: bool
    warmup_steps: int
    timed_steps: int
    sec_per_step: float | None = None
    sec_per_sample: float | None = None
    step_seconds: list[float] = field(default_factory=list)   # every logged step, warm-up included
    losses: list[float | None] = field(default_factory=list)  # the logged total loss of every step (None: not finite)
    overflow_skips: int | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    start_memory_mb: float | None = None   # CUDA memory still allocated when the case began (leftovers)


@dataclass(kw_only=True)
class ResumeCheck(Entry):
    """Kill (SIGKILL) and resume of ``python -m replication.stage sd15_train``.

    ``checkpoint_step``: the newest complete checkpoint when the first run was killed (after it had
    logged ``killed_after_step``); ``resumed_at_step``: the step the rerun reports resuming at;
    ``steps_after_resume``: the steps the rerun logged; ``loss_before_kill`` / ``loss_after_resume``:
    the total loss of step ``checkpoint_step + 1`` in each run (equal up to non-deterministic kernels);
    ``checkpoint_bytes`` / ``checkpoint_files``: the size on disk of that checkpoint (student,
    optimizer, EMA, RNG states, step)."""

    method: str
    mixed_precision: str
    batch_size: int
    first_exit: int | None = None
    resume_exit: int | None = None
    checkpoint_step: int | None = None
    killed_after_step: int | None = None
    resumed_at_step: int | None = None
    final_step: int | None = None
    steps_after_resume: list[int] = field(default_factory=list)
    loss_before_kill: float | None = None
    loss_after_resume: float | None = None
    checkpoint_bytes: int | None = None
    checkpoint_files: dict[str, int] = field(default_factory=dict)
    first_run_s: float | None = None
    resume_run_s: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass(kw_only=True)
class GenerationCase(Entry):
    """Sampling throughput of one sampler setting (warm-up batch excluded, PNG writing included,
    as in the evaluation). ``unet_passes_per_image``: steps, doubled under CFG."""

    model: str
    scheduler: str
    steps: int
    guidance: float
    dtype: str
    batch_size: int
    n_images: int
    unet_passes_per_image: int
    sec_per_image: float | None = None
    images_per_s: float | None = None
    peak_memory_mb: float | None = None


@dataclass(kw_only=True)
class DivergenceCase(Entry):
    """One estimate of ``e^T (dv/dx) e`` against the reference, the VJP estimate in float32 with
    TF32 off on the same probes: ``rel_error = ||estimate - reference|| / ||reference||`` over the
    batch. ``estimator``: ``fd`` (forward difference at ``fd_step``) or ``vjp``."""

    estimator: str
    fd_step: float | None
    precision: str
    rel_error: float | None = None
    reference_norm: float | None = None


@dataclass(kw_only=True)
class Components(Entry):
    """The random-weight pipeline folder and the caption folder the run built."""

    kind: str                    # "sd15" (the real configs) | "tiny"
    image_size: int              # px of the caption folder's square images
    unet_params: int | None = None
    vae_params: int | None = None
    text_encoder_params: int | None = None
    pipeline_bytes: int | None = None
    n_captions: int | None = None


@dataclass
class Environment:
    device: str
    device_type: str             # "cuda" | "cpu"
    torch: str
    cuda: str | None
    diffusers: str
    accelerate: str
    transformers: str
    cpu_threads: int


@dataclass
class SmokeReport:
    """The whole run (``size``: ``tiny`` or ``full``; ``plan``: the plan it ran, as written)."""

    schema: int
    size: str
    complete: bool
    started: str
    wall_s: float
    environment: Environment
    plan: dict[str, Any]
    recipe: dict[str, Any]
    components: Components | None = None
    train: list[TrainCase] = field(default_factory=list)
    resume: ResumeCheck | None = None
    generation: list[GenerationCase] = field(default_factory=list)
    divergence: list[DivergenceCase] = field(default_factory=list)


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: SmokeReport, path: str | Path) -> None:
    """``report`` as JSON at ``path`` (temp file + rename)."""
    atomic_write_text(json.dumps(_finite(asdict(report)), indent=2, allow_nan=False) + "\n", path)


def read_report(path: str | Path) -> SmokeReport:
    """The report at ``path``; an unknown key, a missing one or a wrong type raises ``ConfigError``."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        from ...config import ConfigError

        raise ConfigError(f"{path}: schema = {data.get('schema') if isinstance(data, dict) else data!r}: "
                          f"expected {SCHEMA_VERSION} (rerun python -m replication.sd15.gpu_smoke)")
    return from_dict(SmokeReport, data, str(path), complete=True)
