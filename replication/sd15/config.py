"""Configs of the SD 1.5 tier: trainer and COCO evaluator, dataclasses validated on construction.

A YAML file maps onto ``SD15TrainConfig`` / ``SD15EvalConfig`` one to one (``load_config``); an
unknown key, a wrong type or a bad value raises ``ConfigError`` naming the key path and the value,
before any model is loaded. Keys without effect given the others are rejected (``inactive_fields``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from marflow_core.divergence import PROBE_KINDS
from marflow_core.errors import InvalidParameter

from ..config import ConfigError, from_dict, load_params

T = TypeVar("T")

TARGETS: tuple[str, ...] = ("diff_eps", "ddim_eps", "velocity")
GUIDANCE_MODES: tuple[str, ...] = ("sync", "baked")
METHODS: tuple[str, ...] = ("perflow", "perflow_ma")
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
MA_DIVERGENCES: tuple[str, ...] = ("hutchinson_fd", "hutchinson")


def _check(items: list[tuple[str, Any, bool, str]]) -> None:
    for key, value, ok, why in items:
        if not ok:
            raise InvalidParameter(key, value, why)


@dataclass
class PeRFlowSD15Config:
    """PeRFlow on SD 1.5 (docs/method.md, section 2).

    ``windows`` K equal windows; ``teacher_steps`` M DDIM steps of the teacher per window;
    ``target``: ``diff_eps`` / ``ddim_eps`` (the student keeps the eps head) or ``velocity``;
    ``guidance``: ``sync`` (CFG-sync: teacher at guidance 1.0 on the same ``cfg_drop``-dropped
    prompts as the student) or ``baked`` (teacher at ``teacher_guidance`` on the full prompt, student
    on the dropped prompt: guidance baked into the student); ``discrete_timesteps``: 0 draws ``t`` on
    the 1/1000 grid of SD timesteps, N > 0 on a grid of N points.
    """

    windows: int = 4
    teacher_steps: int = 8
    target: str = "diff_eps"
    guidance: str = "sync"
    cfg_drop: float = 0.1
    teacher_guidance: float = 7.5
    discrete_timesteps: int = 0

    def __post_init__(self) -> None:
        _check([
            ("windows", self.windows, 1 <= self.windows <= 100, "K must be in 1..100"),
            ("teacher_steps", self.teacher_steps, self.teacher_steps >= 1, "M must be >= 1"),
            ("target", self.target, self.target in TARGETS, f"one of {TARGETS}"),
            ("guidance", self.guidance, self.guidance in GUIDANCE_MODES, f"one of {GUIDANCE_MODES}"),
            ("cfg_drop", self.cfg_drop, 0.0 <= self.cfg_drop < 1.0, "must be in [0, 1)"),
            ("teacher_guidance", self.teacher_guidance, self.teacher_guidance >= 1.0, "must be >= 1"),
            ("discrete_timesteps", self.discrete_timesteps, self.discrete_timesteps >= 0,
             "0 (the 1000-step grid) or a grid size > 0"),
        ])
        if self.discrete_timesteps:
            _check([("discrete_timesteps", self.discrete_timesteps,
                     self.discrete_timesteps % self.windows == 0, "must be a multiple of windows")])

    def inactive_fields(self) -> dict[str, str]:
        if self.guidance == "sync":
            return {"teacher_guidance": "guidance = 'sync' runs the teacher at guidance 1.0"}
        return {}


@dataclass
class SD15MAConfig:
    """The MA term through the UNet (docs/method.md, section 4, a reconstruction).

    ``weight`` lambda; ``substeps`` n Euler sub-steps of the student per window; ``divergence``:
    ``hutchinson_fd`` (forward differences, first-order backward only, works with fused attention)
    or ``hutchinson`` (VJP + double backward; the UNet's attention is switched to the plain
    ``AttnProcessor``); ``fd_step`` the finite-difference step; ``fd_fp32`` runs the MA forward passes
    in float32 under mixed precision (a step of 1e-2 is below fp16 resolution of activations);
    ``every`` runs the term on every N-th step; ``normalize_by_dim`` divides by the latent dimension.
    """

    weight: float = 0.1
    substeps: int = 1
    divergence: str = "hutchinson_fd"
    n_probes: int = 1
    probe_kind: str = "rademacher"
    fd_step: float = 1e-2
    fd_fp32: bool = True
    every: int = 1
    normalize_by_dim: bool = True
    window_weights: list[float] | None = None

    def __post_init__(self) -> None:
        _check([
            ("weight", self.weight, self.weight >= 0, "lambda must be >= 0"),
            ("substeps", self.substeps, self.substeps >= 1, "must be >= 1"),
            ("divergence", self.divergence, self.divergence in MA_DIVERGENCES, f"one of {MA_DIVERGENCES}"),
            ("n_probes", self.n_probes, self.n_probes >= 1, "must be >= 1"),
            ("probe_kind", self.probe_kind, self.probe_kind in PROBE_KINDS, f"one of {PROBE_KINDS}"),
            ("fd_step", self.fd_step, self.fd_step > 0, "must be > 0"),
            ("every", self.every, self.every >= 1, "must be >= 1"),
        ])
        if self.window_weights is not None:
            _check([("window_weights", self.window_weights, all(w >= 0 for w in self.window_weights),
                     "weights must be >= 0")])

    def inactive_fields(self) -> dict[str, str]:
        if self.divergence != "hutchinson_fd":
            return dict.fromkeys(("fd_step", "fd_fp32"), "only divergence = 'hutchinson_fd' uses them")
        return {}


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then a constant rate (PeRFlow's public recipe: lr 8e-5, warm-up 500)."""

    lr: float = 8e-5
    warmup: int = 500
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check([
            ("lr", self.lr, self.lr > 0, "must be > 0"),
            ("warmup", self.warmup, self.warmup >= 0, "must be >= 0"),
            ("beta1", self.beta1, 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", self.beta2, 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "must be >= 0"),
            ("eps", self.eps, self.eps > 0, "must be > 0"),
            ("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "must be > 0"),
        ])


@dataclass
class SD15TrainConfig:
    """The trainer: inputs, method, optimisation, precision, checkpoints and outputs.

    ``model_dir`` a local diffusers SD pipeline folder (teacher, and the student's initial weights);
    ``data_dir`` a caption folder (``images/`` + ``captions.jsonl``, see replication/sd15/data.py);
    ``output_dir`` receives ``checkpoints/``, ``pipeline/``, ``delta_weights.safetensors``.
    ``batch_size`` is per process and per accumulation micro-step: the global batch is
    ``batch_size * processes * grad_accum``. ``debug_dump``: a file to which step 1 writes its loss,
    gradient norm and flattened gradient (all processes' average), for the multi-process test.
    """

    model_dir: str
    data_dir: str
    output_dir: str
    method: str = "perflow_ma"
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    grad_accum: int = 1
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    ema: bool = True
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000
    checkpoints_total_limit: int | None = 3
    log_every: int = 10
    dataloader_workers: int = 4
    save_delta_weights: bool = True
    debug_dump: str | None = None
    progress: bool = True
    perflow: PeRFlowSD15Config = field(default_factory=PeRFlowSD15Config)
    ma: SD15MAConfig = field(default_factory=SD15MAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _check([
            ("method", self.method, self.method in METHODS, f"one of {METHODS}"),
            ("resolution", self.resolution, self.resolution >= 8 and self.resolution % 8 == 0,
             "must be a multiple of 8, >= 8"),
            ("steps", self.steps, self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum, self.grad_accum >= 1, "must be >= 1"),
            ("mixed_precision", self.mixed_precision, self.mixed_precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("ema_decay", self.ema_decay, 0 < self.ema_decay < 1, "must be in (0, 1)"),
            ("checkpoint_every", self.checkpoint_every, self.checkpoint_every >= 1, "must be >= 1"),
            ("checkpoints_total_limit", self.checkpoints_total_limit,
             self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "null or >= 1"),
            ("log_every", self.log_every, self.log_every >= 1, "must be >= 1"),
            ("dataloader_workers", self.dataloader_workers, self.dataloader_workers >= 0, "must be >= 0"),
        ])
        for key in ("model_dir", "data_dir", "output_dir"):
            _check([(key, getattr(self, key), bool(getattr(self, key)), "must be a non-empty path")])
        if self.method == "perflow_ma" and self.ma.window_weights is not None:
            _check([("ma.window_weights", self.ma.window_weights,
                     len(self.ma.window_weights) == self.perflow.windows,
                     f"needs one weight per window ({self.perflow.windows})")])

    def inactive_fields(self) -> dict[str, str]:
        unused = {}
        if self.method == "perflow":
            unused["ma"] = "method = 'perflow' has no MA term"
        if not self.ema:
            unused["ema_decay"] = "ema = false"
        return unused


@dataclass
class ModelSpec:
    """One model to evaluate: a local diffusers pipeline folder and how to sample it.

    ``scheduler``: ``own`` (the folder's scheduler: our students carry marflow's PeRFlowScheduler),
    ``perflow`` (marflow's PeRFlowScheduler with ``perflow_windows`` / ``perflow_prediction_type``,
    e.g. for a published PeRFlow folder), ``ddim``, ``dpm_solver`` (DPMSolverMultistepScheduler),
    ``euler``; ``steps`` the sampling step counts; ``guidance`` the CFG scale (1.0 = none);
    ``delta_weights`` optional PeRFlow-style delta weights added to the folder's UNet.
    """

    path: str
    scheduler: str = "own"
    steps: list[int] = field(default_factory=lambda: [4, 8])
    guidance: float = 4.5
    delta_weights: str | None = None
    perflow_windows: int = 4
    perflow_prediction_type: str = "diff_eps"

    def inactive_fields(self) -> dict[str, str]:
        if self.scheduler != "perflow":
            return dict.fromkeys(("perflow_windows", "perflow_prediction_type"), "only scheduler = 'perflow' uses it")
        return {}

    def __post_init__(self) -> None:
        schedulers = ("own", "perflow", "ddim", "dpm_solver", "euler")
        _check([("perflow_windows", self.perflow_windows, self.perflow_windows >= 1, "must be >= 1"),
                ("perflow_prediction_type", self.perflow_prediction_type, self.perflow_prediction_type in TARGETS,
                 f"one of {TARGETS}")])
        _check([
            ("path", self.path, bool(self.path), "must be a non-empty path"),
            ("scheduler", self.scheduler, self.scheduler in schedulers, f"one of {schedulers}"),
            ("steps", self.steps, bool(self.steps) and all(s >= 1 for s in self.steps),
             "a non-empty list of step counts >= 1"),
            ("guidance", self.guidance, self.guidance >= 1.0, "must be >= 1"),
        ])


@dataclass
class SD15EvalConfig:
    """COCO-2017 evaluation of any number of diffusers pipeline folders with one protocol.

    ``coco_dir`` holds ``annotations/captions_val2017.json`` and ``val2017/*.jpg``; ``n_prompts``
    the first caption of the first N images by ascending image id; images of ``resolution`` px from
    seeds ``seed + i``; FID (torch-fidelity, ``fid_extractor``) against the centre-cropped,
    resized val images; CLIP score (open_clip ``clip_model`` / ``clip_pretrained``, or a local
    ``clip_checkpoint`` file) as the mean cosine similarity (not x100), the scale of the reference
    table (0.294). ``fid_extractor`` ``inception-v3-compat`` is torch-fidelity's; a name registered
    with ``replication.sd15.metrics.register_extractor`` works too (tests register tiny ones).
    """

    coco_dir: str
    output_dir: str
    models: dict[str, ModelSpec] = field(default_factory=dict)
    n_prompts: int = 5000
    resolution: int = 512
    seed: int = 0
    batch_size: int = 16
    fid_extractor: str = "inception-v3-compat"
    fid_extractor_weights: str | None = None
    clip_model: str = "ViT-g-14"
    clip_pretrained: str = "laion2b_s12b_b42k"
    clip_checkpoint: str | None = None
    mixed_precision: str = "fp16"
    keep_images: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check([
            ("n_prompts", self.n_prompts, self.n_prompts >= 2, "FID needs >= 2 images"),
            ("resolution", self.resolution, self.resolution >= 8 and self.resolution % 8 == 0,
             "must be a multiple of 8, >= 8"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1"),
            ("models", self.models, bool(self.models), "name at least one pipeline folder to evaluate"),
            ("mixed_precision", self.mixed_precision, self.mixed_precision in PRECISIONS, f"one of {PRECISIONS}"),
        ])


def load_config(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """The dataclass ``cls`` from YAML file ``path`` (its top-level mapping, or key ``section``)."""
    data = load_params(path)
    where = section or Path(path).name
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: no section {section!r}; top-level keys: {sorted(data)}")
        data = data[section]
    return from_dict(cls, data, where)


def run_cli(prog: str, description: str, cls: type[T], check, run, argv: list[str] | None = None) -> int:
    """The SD 1.5 entry points' command line: ``--config`` (YAML mapping onto ``cls``) and
    ``--section``; a bad config or missing input is one line on stderr, exit status 2, and ``run``
    is never called."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"YAML file mapping onto {cls.__name__}")
    parser.add_argument("--section", default=None, help="top-level key of the YAML holding the config")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.section)
        check(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(cfg)
    return 0
