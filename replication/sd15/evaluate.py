"""COCO-2017 text-to-image evaluation of any diffusers SD pipeline folder (teacher, published, ours).

    python -m replication.stage sd15_eval [--params FILE]   (one process; generation is not sharded)

The stage ``sd15_eval`` (``stages.py``) calls ``run_stage`` with its section, an ``SD15EvalConfig``.
For each model (the configured ones and, when its delta weights are given, the published PeRFlow
row), step count and guidance scale: images from the first caption of the first ``n_prompts`` val
images, seed ``seed + i`` for image ``i``, at ``resolution`` px; FID against the val images
prepared as the published protocol does (``coco.py``) and the CLIP score (cosine similarity).
Writes ``output_dir/metrics.json`` and ``output_dir/comparison.md`` (our rows beside every published
SD 1.5 row of ``replication/references/peers.yaml``, each marked comparable or not with the
differing protocol fields named); the generated images stay under ``output_dir/images/`` with
``keep_images``. Inputs are checked first: a missing folder or file is one line on stderr, exit
status 2, nothing written. The weights the scoring needs are among them (``check_metric_weights``:
the FID extractor's, and the CLIP checkpoint, a named file or open_clip's cached download), and the
CLIP model is loaded before any image is generated.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from marflow_core.atomic import atomic_write_text

from ..config import ConfigError
from .config import PUBLISHED_PERFLOW, ModelSpec, SD15EvalConfig
from .inputs import check_coco_dir, check_delta_weights, check_pipeline_dir, check_weights_file, checked_inputs

ClipFn = Callable[[Sequence[Image.Image], Sequence[str]], torch.Tensor]


#: torch-fidelity's extractors that download their weights when ``fid_extractor_weights`` is null
FIDELITY_WEIGHTS = {"inception-v3-compat": "weights-inception-2015-12-05-6726825d.pth"}
WEIGHTS_HINT = ("copy it from a machine with network (docs/gpu.md, Inputs) and name it in "
                "replication/gpu/params.yaml")


def check_metric_weights(cfg: SD15EvalConfig) -> None:
    """The weight files of the FID extractor and a local CLIP checkpoint exist, or ``MissingInput``
    naming the key: scoring runs after generation, so a file it lacks would fail hours late.
    ``fid_extractor_weights: null`` with a torch-fidelity extractor needs its file in torch's hub
    cache; an extractor registered without weights (tests) needs none."""
    if cfg.fid_extractor_weights is not None:
        check_weights_file(cfg.fid_extractor_weights, "fid_extractor_weights",
                           f"the {cfg.fid_extractor} FID weights file", WEIGHTS_HINT)
    elif cfg.fid_extractor in FIDELITY_WEIGHTS:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / FIDELITY_WEIGHTS[cfg.fid_extractor]
        if not cached.is_file():
            check_weights_file(None, "fid_extractor_weights",
                               f"the {cfg.fid_extractor} FID weights (not in torch-fidelity's cache {cached})",
                               WEIGHTS_HINT)
    if cfg.clip_checkpoint is not None:
        check_weights_file(cfg.clip_checkpoint, "clip_checkpoint", f"the {cfg.clip_model} CLIP checkpoint",
                           WEIGHTS_HINT)
    elif cfg.clip_pretrained:
        missing = open_clip_missing(cfg.clip_model, cfg.clip_pretrained)
        if missing is not None:
            check_weights_file(None, "clip_checkpoint", f"the {cfg.clip_model} CLIP weights "
                               f"(clip_pretrained = {cfg.clip_pretrained!r}: {missing})", WEIGHTS_HINT)


def open_clip_missing(model: str, pretrained: str) -> str | None:
    """Why open_clip would download ``model`` / ``pretrained`` (no network here), None when it need
    not: ``pretrained`` is a local file, or its hub file (``open_clip_model.safetensors`` or
    ``open_clip_pytorch_model.bin``) is in the Hugging Face cache, or its URL download is in
    ``~/.cache/clip`` (open_clip's ``download_pretrained``)."""
    import open_clip

    if Path(pretrained).is_file():
        return None
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        return f"open_clip knows no pretrained weights {pretrained!r} for {model!r} and no such file exists"
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # a trailing "/": open_clip's default file name
        names = ["open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
            return None
        return f"{' or '.join(names)} of {repo} is not in the Hugging Face cache"
    url = cfg.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / Path(url).name
    return None if url and cached.is_file() else f"{cached} is not there"


def check_inputs(cfg: SD15EvalConfig) -> tuple[Path, Path]:
    """COCO folder, every model folder and the metrics' weight files exist with the expected layout;
    returns the COCO paths."""
    from .coco import check_reference_images, coco_prompts

    for name, spec in cfg.evaluated_models().items():
        key = "published_perflow.base" if name == PUBLISHED_PERFLOW else f"models.{name}.path"
        path = check_pipeline_dir(spec.path, key, require_epsilon=False)
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        windows = (spec.perflow_windows if spec.scheduler == "perflow" else
                   sched.get("num_time_windows", 1) if spec.scheduler == "own" and
                   sched.get("_class_name") == "PeRFlowScheduler" else 1)
        if min(spec.steps) < windows:
            raise ConfigError(f"models.{name}.steps = {spec.steps}: a PeRFlow scheduler with {windows} windows "
                              f"needs >= {windows} steps (one per window); fewer steps need a student trained "
                              f"with fewer windows")
        if spec.delta_weights:
            key = "published_perflow.delta_weights" if name == PUBLISHED_PERFLOW else f"models.{name}.delta_weights"
            check_delta_weights(spec.delta_weights, spec.delta_variant, key)
    ann, images = check_coco_dir(cfg.coco_dir)
    check_reference_images(images, coco_prompts(ann, cfg.n_prompts))
    check_metric_weights(cfg)
    return ann, images


def load_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """The pipeline of ``spec.path`` with the requested scheduler (and delta weights) on ``device``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from .components import load_sd_pipeline, merge_delta_weights
    from .scheduler import perflow_scheduler_from

    pipe = load_sd_pipeline(spec.path, dtype=dtype)
    if spec.delta_weights:
        merge_delta_weights(pipe.unet, spec.delta_weights, spec.delta_variant)
    config = pipe.scheduler.config
    if spec.scheduler == "perflow":
        pipe.scheduler = perflow_scheduler_from(config, spec.perflow_prediction_type, spec.perflow_windows)
    elif spec.scheduler != "own":
        cls = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler}[spec.scheduler]
        pipe.scheduler = cls.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts: list, steps: int, guidance: float, cfg: SD15EvalConfig, out: Path,
             device: torch.device, progress: bool = True) -> Path:
    """``out/<image_id>.png`` for every prompt (seed ``cfg.seed + i``), written to a temp folder then
    renamed; an existing complete folder is reused (an interrupted run resumes per setting)."""
    from tqdm.auto import tqdm

    names = [f"{p.image_id:012d}.png" for p in prompts]
    if out.is_dir() and sorted(x.name for x in out.iterdir()) == sorted(names):
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen_device = "cpu" if device.type == "mps" else device
    for lo in tqdm(range(0, len(prompts), cfg.batch_size), disable=not progress, desc=f"{out.parent.name} {steps} steps"):
        batch = prompts[lo:lo + cfg.batch_size]
        gens = [torch.Generator(gen_device).manual_seed(cfg.seed + lo + j) for j in range(len(batch))]
        images = pipe([p.caption for p in batch], num_inference_steps=steps, guidance_scale=guidance,
                      height=cfg.resolution, width=cfg.resolution, generator=gens, output_type="pil").images
        for p, img in zip(batch, images, strict=True):
            img.save(tmp / f"{p.image_id:012d}.png")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def clip_score(folder: Path, prompts: list, scorer: ClipFn, batch_size: int) -> float:
    """Mean cosine similarity of each generated image with its prompt."""
    sims = []
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo:lo + batch_size]
        images = [Image.open(folder / f"{p.image_id:012d}.png").convert("RGB") for p in batch]
        sims.append(scorer(images, [p.caption for p in batch]))
    return float(torch.cat(sims).mean())


def run_stage(configs: dict[str, SD15EvalConfig], progress: bool) -> dict[str, Any]:
    """The ``sd15_eval`` stage: check the inputs, then generate and score every model."""
    ((section, cfg),) = configs.items()
    checked_inputs(section, check_inputs, cfg)
    metrics = evaluate(cfg, progress=progress)
    return {"metrics": str(Path(cfg.output_dir) / "metrics.json"), "rows": len(metrics["rows"])}


def evaluate(cfg: SD15EvalConfig, clip_scorer: ClipFn | None = None, device: torch.device | None = None,
             progress: bool = True) -> dict:
    """Check the inputs, generate, score and write ``metrics.json`` + ``comparison.md``; returns the
    metrics dict."""
    from .coco import coco_prompts, write_references
    from .metrics import ClipScorer, fid
    from .references import NOT_PROVIDED, comparison_table, our_protocol

    ann, image_dir = check_inputs(cfg)
    if device is None:
        from accelerate import PartialState

        device = PartialState().device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 convolutions are not implemented on CPU
    if clip_scorer is None:  # loaded before any image is generated
        clip_scorer = ClipScorer(cfg.clip_model, cfg.clip_checkpoint or cfg.clip_pretrained, device)
    prompts = coco_prompts(ann, cfg.n_prompts)
    out = Path(cfg.output_dir)
    reference = write_references(image_dir, prompts, cfg.resolution, out / f"reference_lanczos_{cfg.resolution}")
    rows = []
    for name, spec in cfg.evaluated_models().items():
        pipe = load_pipeline(spec, device, dtype)
        for steps in spec.steps:
            for guidance in spec.guidance:
                folder = generate(pipe, prompts, steps, guidance, cfg,
                                  out / "images" / name / f"steps_{steps}_guidance_{guidance:g}", device, progress)
                row = {"model": name, "steps": steps, "guidance": guidance, "scheduler": spec.scheduler,
                       "published": name == PUBLISHED_PERFLOW,
                       "fid": fid(folder, reference, cfg.fid_extractor, cfg.fid_extractor_weights,
                                  device.type == "cuda"),
                       "clip": clip_score(folder, prompts, clip_scorer, cfg.batch_size)}
                rows.append(row)
                if not cfg.keep_images:
                    shutil.rmtree(folder)
        del pipe
    protocol = our_protocol(cfg)
    published = cfg.published_perflow.delta_weights
    metrics = {"protocol": {**protocol, "seed": cfg.seed, "fid_extractor": cfg.fid_extractor,
                            "clip": f"{cfg.clip_model}/{cfg.clip_checkpoint or cfg.clip_pretrained}",
                            "clip_scale": "cosine similarity"},
               "published_perflow": published if published is not None else NOT_PROVIDED,
               "rows": rows}
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", out / "metrics.json")
    note = (f"FID extractor {cfg.fid_extractor}, CLIP {cfg.clip_model}/{cfg.clip_checkpoint or cfg.clip_pretrained}, "
            f"seed {cfg.seed} + i for image i")
    atomic_write_text(comparison_table(rows, protocol, note, published), out / "comparison.md")
    return metrics
