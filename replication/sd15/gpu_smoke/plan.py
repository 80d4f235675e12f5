"""What a smoke run measures: the ``gpu_smoke`` profile (``replication/profiles/gpu_smoke.yaml``).

The profile holds one plan per size, ``gpu_smoke.full`` (SD 1.5's real component configs, 512 px, one
GPU in under 8 minutes) and ``gpu_smoke.tiny`` (the tiny stand-ins of ``replication.sd15.tiny``, CPU,
the tests). Each maps onto ``SmokePlan`` through ``replication.config.from_dict``: an unknown key, a
missing key or a bad value is a ``ConfigError`` naming it (``gpu_smoke.full.cases.x.batch_sizes``).

The training recipe is not repeated here: every training case starts from the ``sd15_train``
(PeRFlow + MA) or ``sd15_train_perflow`` (PeRFlow) section of ``replication/gpu/params.yaml``,
with the plan's ``train_overrides`` merged over it and the case's own batch size and precision
(``replication.sd15.gpu_smoke.training.case_config``). The profile is read by the smoke command
only; it is not an overlay of ``params.yaml`` (``python -m replication.profile gpu_smoke`` refuses
it, naming the unknown section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import fail, from_dict, load_params, require

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "gpu_smoke.yaml"
SIZES: tuple[str, ...] = ("tiny", "full")
COMPONENTS: tuple[str, ...] = ("sd15", "tiny")
TRAIN_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
PASS_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
SCHEDULERS: tuple[str, ...] = ("perflow", "ddim", "dpm_solver", "euler")
#: ``sd15_train`` keys the kill-and-resume check sets itself
RESUME_FIXED = frozenset({"steps", "batch_size", "mixed_precision", "checkpoint_every", "log_every",
                          "model_dir", "data_dir", "output_dir", "student", "grad_accum", "debug_dump"})


@dataclass
class CaptionsPlan:
    """The random caption folder: ``n_images`` noise images of ``size`` x ``size`` px."""

    n_images: int
    size: int

    def validate(self, where: str) -> None:
        require(self.n_images >= 1, f"{where}.n_images", self.n_images, "must be >= 1")
        require(self.size >= 8, f"{where}.size", self.size, "must be >= 8 px")


@dataclass
class TrainCasePlan:
    """One training configuration, run once per batch size (ascending; an out-of-memory batch
    skips the larger ones). ``ma``: PeRFlow + MA (``sd15_train``) or PeRFlow
    (``sd15_train_perflow``); ``ma_fd_fp32`` (MA only, null without): the finite-difference passes in
    float32 (``true``) or in the mixed precision (``false``)."""

    ma: bool
    mixed_precision: str
    batch_sizes: list[int]
    ma_fd_fp32: bool | None = None

    def validate(self, where: str) -> None:
        require(self.mixed_precision in TRAIN_PRECISIONS, f"{where}.mixed_precision", self.mixed_precision,
                f"one of {TRAIN_PRECISIONS}")
        require(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), f"{where}.batch_sizes",
                self.batch_sizes, "a non-empty list of batch sizes >= 1")
        require(len(set(self.batch_sizes)) == len(self.batch_sizes), f"{where}.batch_sizes",
                self.batch_sizes, "list each batch size once")
        needs_fd = self.ma and self.mixed_precision != "no"
        require((self.ma_fd_fp32 is not None) == needs_fd, f"{where}.ma_fd_fp32", self.ma_fd_fp32,
                "true or false for an MA case under mixed precision, null otherwise")


@dataclass
class ResumePlan:
    """Kill and resume: a run of ``python -m replication.stage sd15_train`` that checkpoints every
    ``checkpoint_step`` steps is killed (SIGKILL) once it has logged the step after its first
    checkpoint; the rerun must resume from the newest complete checkpoint and train
    ``resume_steps`` more. ``overrides``: more ``sd15_train`` keys for both runs (e.g.
    ``save_delta_weights``); ``timeout_s`` bounds each run."""

    ma: bool
    mixed_precision: str
    batch_size: int
    checkpoint_step: int
    resume_steps: int
    timeout_s: float
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(self.mixed_precision in TRAIN_PRECISIONS, f"{where}.mixed_precision", self.mixed_precision,
                f"one of {TRAIN_PRECISIONS}")
        for key in ("batch_size", "checkpoint_step", "resume_steps"):
            require(getattr(self, key) >= 1, f"{where}.{key}", getattr(self, key), "must be >= 1")
        require(self.timeout_s > 0, f"{where}.timeout_s", self.timeout_s, "must be > 0")
        for key in sorted(set(self.overrides) & RESUME_FIXED):
            fail(f"{where}.overrides.{key}", self.overrides[key], "set by the resume check itself")


@dataclass
class GenerationModel:
    """A sampler timed on the random pipeline: ``scheduler`` (``perflow``: the student's, with the
    recipe's windows and target), ``steps`` and CFG ``guidance``."""

    scheduler: str
    steps: list[int]
    guidance: float

    def validate(self, where: str) -> None:
        require(self.scheduler in SCHEDULERS, f"{where}.scheduler", self.scheduler, f"one of {SCHEDULERS}")
        require(bool(self.steps) and all(s >= 1 for s in self.steps), f"{where}.steps", self.steps,
                "a non-empty list of step counts >= 1")
        require(self.guidance >= 1.0, f"{where}.guidance", self.guidance, "must be >= 1")


@dataclass
class GenerationPlan:
    """Images per second of each ``models`` entry: one warm-up batch, then ``timed_batches``
    batches of ``batch_size`` images through the evaluator's own ``generate``."""

    batch_size: int
    timed_batches: int
    models: dict[str, GenerationModel]

    def validate(self, where: str) -> None:
        require(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "must be >= 1")
        require(self.timed_batches >= 1, f"{where}.timed_batches", self.timed_batches, "must be >= 1")
        require(bool(self.models), f"{where}.models", self.models, "name at least one sampler")


@dataclass
class DivergencePlan:
    """Finite-difference Hutchinson divergence of the student velocity against its VJP estimate
    (same probes, float32 with TF32 off as the reference) at each ``fd_steps`` and pass
    ``precisions``, on ``batch_size`` window starts with ``n_probes`` probes."""

    batch_size: int
    n_probes: int
    fd_steps: list[float]
    precisions: list[str]

    def validate(self, where: str) -> None:
        require(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "must be >= 1")
        require(self.n_probes >= 1, f"{where}.n_probes", self.n_probes, "must be >= 1")
        require(bool(self.fd_steps) and all(h > 0 for h in self.fd_steps), f"{where}.fd_steps",
                self.fd_steps, "a non-empty list of steps > 0")
        bad = [p for p in self.precisions if p not in PASS_PRECISIONS]
        require(bool(self.precisions) and not bad, f"{where}.precisions", self.precisions,
                f"a non-empty list of {PASS_PRECISIONS}")


@dataclass
class SmokePlan:
    """One size's plan. ``components``: ``sd15`` (the real configs of ``sd15_config/``, random
    weights) or ``tiny``; ``train_overrides`` are merged over both training sections;
    ``warmup_steps`` are trained and not timed, ``timed_steps`` timed; training cases start only
    while the run is younger than ``train_budget_s`` (a case not started is recorded as skipped)."""

    components: str
    captions: CaptionsPlan
    train_overrides: dict[str, Any]
    gradient_checkpointing: bool
    warmup_steps: int
    timed_steps: int
    train_budget_s: float
    cases: dict[str, TrainCasePlan]
    resume: ResumePlan
    generation: GenerationPlan
    divergence: DivergencePlan

    def validate(self, where: str) -> None:
        require(self.components in COMPONENTS, f"{where}.components", self.components, f"one of {COMPONENTS}")
        require(self.warmup_steps >= 0, f"{where}.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.timed_steps >= 1, f"{where}.timed_steps", self.timed_steps, "must be >= 1")
        require(self.train_budget_s > 0, f"{where}.train_budget_s", self.train_budget_s, "must be > 0")
        require(bool(self.cases), f"{where}.cases", self.cases, "name at least one training case")
        for key in ("gradient_checkpointing", "batch_size", "mixed_precision", "steps", "student"):
            require(key not in self.train_overrides, f"{where}.train_overrides.{key}",
                    self.train_overrides.get(key), "set per case by the plan's own keys")


@dataclass
class GPUSmokeProfile:
    """The ``gpu_smoke`` section of the profile: a plan per size."""

    tiny: SmokePlan
    full: SmokePlan


def load_plan(size: str, profile: str | Path = PROFILE) -> SmokePlan:
    """The validated plan of ``size`` (``tiny`` | ``full``) from ``profile``."""
    require(size in SIZES, "--size", size, f"one of {SIZES}")
    data = load_params(profile, overlay=False)
    require(set(data) == {"gpu_smoke"}, f"{profile}", sorted(data), "expected one top-level key, gpu_smoke")
    return getattr(from_dict(GPUSmokeProfile, data["gpu_smoke"], "gpu_smoke"), size)
