"""Configs of the SD 1.5 tier: trainer and COCO evaluator, the sections ``sd15_train``,
``sd15_train_perflow`` and ``sd15_eval`` of ``replication/gpu/params.yaml`` (``stages.py``).

Each section maps onto ``SD15TrainConfig`` / ``SD15EvalConfig`` one to one through
``replication.config.from_dict``: an unknown key, a wrong type or a bad value raises ``ConfigError``
naming the key path and the value, before any model is loaded. Keys without effect given the
others are rejected (``inactive_fields``). The trainer's optimizer fields are the core's
``TrainConfig``, its student the shared ``StudentSpec`` and its MA settings the core's ``MAConfig``;
only what SD adds is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from marflow_core.errors import InvalidParameter
from marflow_core.marginal import MAConfig
from marflow_core.training import TrainConfig
from marflow_core.trajectory import squared_distance

from ..common.students import StudentSpec
from ..config import require

TARGETS: tuple[str, ...] = ("diff_eps", "ddim_eps", "velocity")
GUIDANCE_MODES: tuple[str, ...] = ("sync", "baked")
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
#: the MA divergences that scale to SD latents (the exact trace needs the whole Jacobian)
MA_DIVERGENCES: tuple[str, ...] = ("hutchinson_fd", "hutchinson")
#: SD 1.5's training timesteps ``T``
SD_TIMESTEPS = 1000


def _check(items: list[tuple[str, Any, bool, str]]) -> None:
    for key, value, ok, why in items:
        if not ok:
            raise InvalidParameter(key, value, why)


@dataclass
class PeRFlowSD15Config:
    """PeRFlow on SD 1.5 (docs/method.md, section 2); the window count is ``student.windows``.

    ``teacher_steps`` M DDIM steps of the teacher per window;
    ``target``: ``diff_eps`` / ``ddim_eps`` (the student keeps the eps head) or ``velocity``;
    ``guidance``: ``sync`` (CFG-sync: teacher at guidance 1.0 on the same ``cfg_drop``-dropped
    prompts as the student) or ``baked`` (teacher at ``teacher_guidance`` on the full prompt, student
    on the dropped prompt: guidance baked into the student); ``discrete_timesteps``: 0 draws ``t`` on
    the 1/1000 grid of SD timesteps, N > 0 on a grid of N points (a multiple of the window count).
    """

    teacher_steps: int = 8
    target: str = "diff_eps"
    guidance: str = "sync"
    cfg_drop: float = 0.1
    teacher_guidance: float = 7.5
    discrete_timesteps: int = 0

    def __post_init__(self) -> None:
        _check([
            ("teacher_steps", self.teacher_steps, self.teacher_steps >= 1, "M must be >= 1"),
            ("target", self.target, self.target in TARGETS, f"one of {TARGETS}"),
            ("guidance", self.guidance, self.guidance in GUIDANCE_MODES, f"one of {GUIDANCE_MODES}"),
            ("cfg_drop", self.cfg_drop, 0.0 <= self.cfg_drop < 1.0, "must be in [0, 1)"),
            ("teacher_guidance", self.teacher_guidance, self.teacher_guidance >= 1.0, "must be >= 1"),
            ("discrete_timesteps", self.discrete_timesteps, self.discrete_timesteps >= 0,
             "0 (the 1000-step grid) or a grid size > 0"),
        ])

    def inactive_fields(self) -> dict[str, str]:
        if self.guidance == "sync":
            return {"teacher_guidance": "guidance = 'sync' runs the teacher at guidance 1.0"}
        return {}


def sd15_ma_recipe() -> MAConfig:
    """This tier's MA settings when the ``ma`` section is absent: one sub-step, one Rademacher probe,
    forward differences with step 1e-2 (docs/gpu.md)."""
    return MAConfig(weight=0.1, substeps=1, divergence="hutchinson_fd", fd_step=1e-2)


@dataclass(kw_only=True)
class SD15TrainConfig(TrainConfig):
    """The trainer: the core's ``TrainConfig`` optimizer fields plus inputs, student, precision,
    checkpoints and outputs.

    ``model_dir`` a local diffusers SD pipeline folder (teacher, and the student's initial weights);
    ``data_dir`` a caption folder (``images/`` + ``captions.jsonl``, see replication/sd15/data.py);
    ``output_dir`` receives ``checkpoints/``, ``pipeline/``, ``delta_weights.safetensors``.
    ``student``: ``method: perflow`` with ``windows`` K and ``ma`` on or off (its ``ma_weight`` /
    ``ma_substeps`` override ``ma``), and one seed (data order and every per-sample draw).
    Optimizer (``TrainConfig``): AdamW at a constant rate by default (lr 8e-5, weight decay 1e-2,
    ``warmup`` 0: PeRFlow's public training script passes ``--lr_scheduler constant``, under which
    diffusers ignores its ``--lr_warmup_steps 500``); ``grad_clip`` <= 0 only measures the gradient
    norm. ``max_overflow_skips`` (``mixed_precision: fp16`` only): a non-finite gradient norm is an
    overflow that accelerate's GradScaler skips (lowering its scale); this many consecutive skips
    stop the run (a non-finite loss stops it at once). ``batch_size`` is per process and per accumulation micro-step: the
    global batch is ``batch_size * processes * grad_accum``. ``ma`` is the core's ``MAConfig``
    (absent: ``sd15_ma_recipe``; keys missing from a given section take ``MAConfig``'s defaults);
    SD runs Hutchinson divergences only (``hutchinson_fd``, or ``hutchinson``, for which the student's
    attention is switched to the plain ``AttnProcessor`` that has a double backward), with the
    continuous log-det on the whole batch. ``ma_fd_fp32`` runs the finite-difference MA passes in
    float32 under mixed precision (a step of 1e-2 is close to fp16 resolution of the activations).
    ``debug_dump``: a file to which step 1 writes its loss, gradient norm and flattened gradient
    (all processes' average), for the multi-process test. Disk (docs/gpu.md, Disk budget): one
    accelerate checkpoint of SD 1.5 is about 14 GB (fp32 student, AdamW moments, EMA), and saving
    one keeps the previous until the new one is complete, so ``checkpoints_total_limit`` N takes
    up to (N + 1) x 14 GB; ``delete_checkpoints_when_done`` deletes them once the final pipeline is
    saved (``finished.json`` then records the run as finished: it is not trained again, and a
    larger ``steps`` is refused, since nothing is left to resume from).
    """

    model_dir: str
    data_dir: str
    output_dir: str
    student: StudentSpec
    steps: int = 4000
    batch_size: int = 32
    lr: float = 8e-5
    warmup: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    checkpoint_every: int = 1000
    log_every: int = 10
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    grad_accum: int = 1
    mixed_precision: str = "fp16"
    max_overflow_skips: int = 20
    gradient_checkpointing: bool = False
    ema: bool = True
    ema_decay: float = 0.9999
    checkpoints_total_limit: int | None = 1
    delete_checkpoints_when_done: bool = False
    dataloader_workers: int = 4
    save_delta_weights: bool = True
    debug_dump: str | None = None
    perflow: PeRFlowSD15Config = field(default_factory=PeRFlowSD15Config)
    ma: MAConfig = field(default_factory=sd15_ma_recipe)
    ma_fd_fp32: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check([
            ("resolution", self.resolution, self.resolution >= 8 and self.resolution % 8 == 0,
             "must be a multiple of 8, >= 8"),
            ("grad_accum", self.grad_accum, self.grad_accum >= 1, "must be >= 1"),
            ("mixed_precision", self.mixed_precision, self.mixed_precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("ema_decay", self.ema_decay, 0 < self.ema_decay < 1, "must be in (0, 1)"),
            ("max_overflow_skips", self.max_overflow_skips, self.max_overflow_skips >= 1, "must be >= 1"),
            ("checkpoints_total_limit", self.checkpoints_total_limit,
             self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "null or >= 1"),
            ("dataloader_workers", self.dataloader_workers, self.dataloader_workers >= 0, "must be >= 0"),
        ])
        for key in ("model_dir", "data_dir", "output_dir"):
            _check([(key, getattr(self, key), bool(getattr(self, key)), "must be a non-empty path")])

    def validate(self, where: str) -> None:
        """What SD cannot do, each refused naming its key (the fields validated themselves)."""
        student = self.student
        record = student.record
        require(record.pairing == "windows" and record.windows is None and
                record.distance is squared_distance, f"{where}.student.method", student.method,
                "the SD 1.5 trainer distills with PeRFlow's windows and its eps target only "
                "(a method with pairing 'windows' and the squared distance, e.g. perflow)")
        require(SD_TIMESTEPS % student.windows == 0, f"{where}.student.windows", student.windows,
                f"K must divide SD's {SD_TIMESTEPS} timesteps (the saved PeRFlowScheduler's windows "
                f"are whole timesteps)")
        require(len(student.seeds) == 1, f"{where}.student.seeds", student.seeds,
                "one output_dir holds one run: give one seed (another seed is another section)")
        grid = self.perflow.discrete_timesteps
        require(grid % student.windows == 0, f"{where}.perflow.discrete_timesteps", grid,
                f"must be a multiple of student.windows ({student.windows})")
        ma = self.student_ma()
        if ma is None:
            return
        require(ma.logdet == "continuous", f"{where}.ma.logdet", ma.logdet,
                "the discrete log-det needs the whole Jacobian of the UNet; use 'continuous'")
        require(ma.divergence in MA_DIVERGENCES, f"{where}.ma.divergence", ma.divergence,
                f"the exact trace needs the whole Jacobian of the UNet; one of {MA_DIVERGENCES}")
        require(ma.batch_fraction == 1, f"{where}.ma.batch_fraction", ma.batch_fraction,
                "must be 1: a fraction of each process's micro-batch is not a fraction of the "
                "global batch, so the step would depend on the process count")
        require(ma.window_weights is None or len(ma.window_weights) == student.windows,
                f"{where}.ma.window_weights", ma.window_weights,
                f"needs one weight per window ({student.windows})")

    def student_ma(self) -> MAConfig | None:
        """The MA settings of the student (``ma`` with its overrides), None without MA."""
        return self.student.ma_config(self.ma)

    def ma_fd_fp32_active(self) -> bool:
        """Whether the finite-difference MA passes leave mixed precision for float32."""
        ma = self.student_ma()
        return (ma is not None and ma.divergence == "hutchinson_fd" and self.ma_fd_fp32
                and self.mixed_precision != "no")

    def inactive_fields(self) -> dict[str, str]:
        unused = {"snapshot_every": "the SD trainer keeps the newest checkpoints_total_limit "
                                    "accelerate checkpoints instead"}
        if not self.student.ma:
            unused["ma"] = "student.ma is false: no MA term"
            unused["ma_fd_fp32"] = "student.ma is false: no MA term"
        elif self.ma.divergence != "hutchinson_fd":
            unused["ma_fd_fp32"] = "only ma.divergence = 'hutchinson_fd' runs finite differences"
        elif self.mixed_precision == "no":
            unused["ma_fd_fp32"] = "mixed_precision = 'no' runs every pass in float32"
        if not self.ema:
            unused["ema_decay"] = "ema = false"
        if self.mixed_precision != "fp16":
            unused["max_overflow_skips"] = "only mixed_precision = 'fp16' has a GradScaler that skips steps"
        return unused


#: the evaluation's guidance sweep when a model lists none: the published protocol's low guidance
#: (Rectified Diffusion's gen_5k.sh samples at 1.5) and the 4.5 our students sample at (PeRFlow's
#: scripts/sd15_t2i_dW.py, 4 steps)
DEFAULT_GUIDANCE: tuple[float, ...] = (1.5, 4.5)


def _check_guidance(values: list[float]) -> tuple[str, Any, bool, str]:
    return ("guidance", values, bool(values) and all(g >= 1.0 for g in values) and len(set(values)) == len(values),
            "a non-empty list of CFG scales >= 1 (1.0 = none), each listed once")


@dataclass
class ModelSpec:
    """One model to evaluate: a local diffusers pipeline folder and how to sample it.

    ``scheduler``: ``own`` (the folder's scheduler: our students carry marflow's PeRFlowScheduler),
    ``perflow`` (marflow's PeRFlowScheduler with ``perflow_windows`` / ``perflow_prediction_type``,
    e.g. for a published PeRFlow folder), ``ddim``, ``dpm_solver`` (DPMSolverMultistepScheduler),
    ``euler``; ``steps`` the sampling step counts; ``guidance`` the CFG scales swept (1.0 = none;
    every (steps, guidance) pair is one row); ``delta_weights`` optional PeRFlow-style delta weights
    added to the folder's UNet: a ``.safetensors`` file (marflow's ``delta_weights.safetensors``) or
    a folder in diffusers' UNet layout (the published ``hansyan/perflow-sd15-delta-weights``),
    whose weight-file variant is ``delta_variant`` (e.g. ``v0-1``; null: the plain file).
    """

    path: str
    scheduler: str = "own"
    steps: list[int] = field(default_factory=lambda: [4, 8])
    guidance: list[float] = field(default_factory=lambda: list(DEFAULT_GUIDANCE))
    delta_weights: str | None = None
    delta_variant: str | None = None
    perflow_windows: int = 4
    perflow_prediction_type: str = "diff_eps"

    def inactive_fields(self) -> dict[str, str]:
        unused = {}
        if self.scheduler != "perflow":
            unused.update(dict.fromkeys(("perflow_windows", "perflow_prediction_type"),
                                        "only scheduler = 'perflow' uses it"))
        if self.delta_weights is None:
            unused["delta_variant"] = "delta_weights is null"
        return unused

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
            _check_guidance(self.guidance),
        ])


@dataclass
class PublishedPeRFlowSpec:
    """The published PeRFlow SD 1.5 delta weights, scored by this evaluator as one more model
    (``perflow_published``); ``delta_weights: null`` leaves them out and the comparison's row says
    "not provided".

    ``delta_weights`` the downloaded ``hansyan/perflow-sd15-delta-weights`` folder (diffusers UNet
    layout, weight variant ``variant``; PeRFlow's README loads ``v0-1``) or a delta ``.safetensors``
    file; ``base`` the SD 1.5 folder they are added to (PeRFlow's ``merge_delta_weights_into_unet``:
    ``W = W_SD + dW``); sampled with marflow's PeRFlowScheduler (``windows``, ``prediction_type``:
    Rectified Diffusion's generate_5k.py samples these weights with ``diff_eps`` and 4 windows) at
    every ``steps`` x ``guidance``.
    """

    delta_weights: str | None = None
    base: str = ""
    variant: str | None = "v0-1"
    windows: int = 4
    prediction_type: str = "diff_eps"
    steps: list[int] = field(default_factory=lambda: [4, 8])
    guidance: list[float] = field(default_factory=lambda: list(DEFAULT_GUIDANCE))

    def inactive_fields(self) -> dict[str, str]:
        if self.delta_weights is None:
            return dict.fromkeys(("base", "variant", "windows", "prediction_type", "steps", "guidance"),
                                 "delta_weights is null: the published PeRFlow row is not evaluated")
        return {}

    def __post_init__(self) -> None:
        if self.delta_weights is None:
            return
        _check([
            ("base", self.base, bool(self.base), "name the SD 1.5 folder the delta weights are added to"),
            ("windows", self.windows, self.windows >= 1, "must be >= 1"),
            ("prediction_type", self.prediction_type, self.prediction_type in TARGETS, f"one of {TARGETS}"),
            ("steps", self.steps, bool(self.steps) and all(s >= self.windows for s in self.steps),
             f"a non-empty list of step counts >= windows ({self.windows}): one step per window at least"),
            _check_guidance(self.guidance),
        ])

    def model_spec(self) -> ModelSpec | None:
        """The evaluated model (``base`` + delta weights, PeRFlow scheduler), None when not provided."""
        if self.delta_weights is None:
            return None
        return ModelSpec(path=self.base, scheduler="perflow", steps=list(self.steps), guidance=list(self.guidance),
                         delta_weights=self.delta_weights, delta_variant=self.variant,
                         perflow_windows=self.windows, perflow_prediction_type=self.prediction_type)


#: the name of the published PeRFlow row among the evaluated models
PUBLISHED_PERFLOW = "perflow_published"


@dataclass
class SD15EvalConfig:
    """COCO-2017 evaluation of any number of diffusers pipeline folders with one protocol.

    ``coco_dir`` holds ``annotations/captions_val2017.json`` and ``val2017/*.jpg``; ``n_prompts``
    the first N images by ascending image id, each with its first caption in the file's order;
    images of ``resolution`` px from seeds ``seed + i``, at every guidance of each model; FID
    (torch-fidelity, ``fid_extractor``) against the val images resized (Lanczos, short side) and
    centre-cropped to ``resolution`` (the published protocol, ``replication/sd15/coco.py``); CLIP score (open_clip ``clip_model`` / ``clip_pretrained``, or a local
    ``clip_checkpoint`` file) as the mean cosine similarity (not x100), the scale of the reference
    table (0.294). ``fid_extractor`` ``inception-v3-compat`` is torch-fidelity's; a name registered
    with ``replication.sd15.metrics.register_extractor`` works too (tests register tiny ones).
    ``published_perflow`` adds the published PeRFlow delta weights as one more model.
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
    published_perflow: PublishedPeRFlowSpec = field(default_factory=PublishedPeRFlowSpec)

    def __post_init__(self) -> None:
        _check([
            ("models", self.models, PUBLISHED_PERFLOW not in self.models,
             f"{PUBLISHED_PERFLOW!r} is the published PeRFlow row (published_perflow); name yours otherwise"),
            ("n_prompts", self.n_prompts, self.n_prompts >= 2, "FID needs >= 2 images"),
            ("resolution", self.resolution, self.resolution >= 8 and self.resolution % 8 == 0,
             "must be a multiple of 8, >= 8"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1"),
            ("models", self.models, bool(self.models), "name at least one pipeline folder to evaluate"),
            ("mixed_precision", self.mixed_precision, self.mixed_precision in PRECISIONS, f"one of {PRECISIONS}"),
        ])

    def evaluated_models(self) -> dict[str, ModelSpec]:
        """``models`` and, when its delta weights are given, the published PeRFlow row (``PUBLISHED_PERFLOW``)."""
        published = self.published_perflow.model_spec()
        return {**self.models, **({PUBLISHED_PERFLOW: published} if published is not None else {})}
