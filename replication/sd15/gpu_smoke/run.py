"""The smoke run: build the random inputs, then measure, writing the report after every entry.

    python -m replication.sd15.gpu_smoke --size full --out results/gpu/smoke.json   # one GPU, < 8 min
    python -m replication.sd15.gpu_smoke --size tiny --out /tmp/smoke.json          # CPU, the tests

Order: inputs (the pipeline folder and the caption folder, under ``--work``), training cases, the
kill-and-resume check, generation, the divergence comparison. The plan is the ``--size`` entry of
``replication/profiles/gpu_smoke.yaml``; the training recipe the ``sd15_train`` /
``sd15_train_perflow`` sections of ``--params`` (``replication/gpu/params.yaml``), the generation
precision its ``sd15_eval.mixed_precision``. Every case is validated before anything is built: a
bad key stops the command in seconds with exit status 2. The work folder is deleted at the end
unless ``--keep-work`` (at full size it holds about 32 GB at its peak: the 4.3 GB pipeline and two
accelerate checkpoints of about 14 GB each).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ...config import ConfigError, deep_merge, load_params
from .plan import PROFILE, SIZES, SmokePlan, load_plan
from .report import SCHEMA_VERSION, Components, SmokeReport, write_report
from .training import Inputs, case_config, recipe_section, schedule

GPU_PARAMS = Path(__file__).resolve().parents[3] / "replication" / "gpu" / "params.yaml"
RECIPE_SECTIONS = ("sd15_train", "sd15_train_perflow", "sd15_eval")
#: set before any hub library is imported (they read them at import time)
OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def load_recipe(params: str | Path = GPU_PARAMS) -> dict:
    """The sections of the GPU params a smoke run reads, each validated as the stages validate it."""
    from ...registry import section

    all_params = load_params(params)
    missing = [name for name in RECIPE_SECTIONS if name not in all_params]
    if missing:
        raise ConfigError(f"{params}: the smoke run needs the sections {missing}")
    for name in RECIPE_SECTIONS:
        section(all_params, name)
    return {name: all_params[name] for name in RECIPE_SECTIONS}


def check_plan(plan: SmokePlan, recipe: dict) -> None:
    """Every training case and both resume runs make a valid trainer config (``ConfigError`` naming
    the case and key otherwise), before anything is built."""
    dummy = Inputs(Path("model"), Path("data"), Path("work"))
    for name, case, batch in schedule(plan):
        case_config(recipe, plan, case.ma, case.mixed_precision, batch, case.ma_fd_fp32, Path("out"), dummy,
                    plan.warmup_steps + plan.timed_steps, where=f"gpu_smoke case {name}")
    r = plan.resume
    case_config(recipe, plan, r.ma, r.mixed_precision, r.batch_size, None, Path("out"), dummy,
                r.checkpoint_step + r.resume_steps, {**r.overrides, "checkpoint_every": r.checkpoint_step},
                where="gpu_smoke.resume")


def build_inputs(plan: SmokePlan, work: Path, stamp: dict) -> tuple[Inputs, Components]:
    from .build import build_captions, build_pipeline, folder_bytes, saved_param_counts

    tic = time.perf_counter()
    model_dir = build_pipeline(plan.components, work / "sd15")
    data_dir = build_captions(work / "captions", plan.captions.n_images, plan.captions.size)
    counts = saved_param_counts(model_dir)
    comp = Components(**stamp, wall_s=time.perf_counter() - tic, status="ok", kind=plan.components,
                      image_size=plan.captions.size, unet_params=counts["unet"], vae_params=counts["vae"],
                      text_encoder_params=counts["text_encoder"], pipeline_bytes=folder_bytes(model_dir),
                      n_captions=plan.captions.n_images)
    return Inputs(model_dir, data_dir, work), comp


def run(size: str, out: Path, work: Path | None = None, keep_work: bool = False, profile: Path = PROFILE,
        params: Path = GPU_PARAMS, log=print) -> SmokeReport:
    """The whole smoke run; returns the report it wrote to ``out``."""
    from .device import environment, release, run_device
    from .divergence import run_divergence
    from .generation import run_generation
    from .resume import run_resume
    from .training import run_cases

    for var in OFFLINE:  # nothing here may reach a hub
        os.environ.setdefault(var, "1")
    plan = load_plan(size, profile)
    recipe = load_recipe(params)
    check_plan(plan, recipe)
    device = run_device()
    env = environment(device)
    stamp = {"device": env.device, "torch": env.torch}
    started = time.perf_counter()
    report = SmokeReport(schema=SCHEMA_VERSION, size=size, complete=False,
                         started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), wall_s=0.0,
                         environment=env, plan=asdict(plan), recipe=recipe)

    def save() -> None:
        report.wall_s = time.perf_counter() - started
        write_report(report, out)

    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    log(f"[gpu_smoke] {size} run on {env.device} (torch {env.torch}); work folder {work}; report {out}")
    save()
    try:
        inputs, report.components = build_inputs(plan, work, stamp)
        log(f"[gpu_smoke] inputs built in {report.components.wall_s:.1f} s: UNet {report.components.unet_params:,} "
            f"parameters, pipeline {report.components.pipeline_bytes / 2**30:.2f} GiB")
        save()
        def add_case(entry) -> None:
            report.train.append(entry)
            save()

        run_cases(plan, recipe, inputs, device, env.device, env.torch,
                  elapsed=lambda: time.perf_counter() - started, on_entry=add_case, log=log)
        report.resume = run_resume(plan, recipe, inputs, env.device, env.torch, log=log)
        save()
        release(device)
        ma = recipe_section(recipe, True)
        train_like = deep_merge(ma, plan.train_overrides)
        report.generation = run_generation(plan, recipe["sd15_eval"], train_like["resolution"],
                                           ma["student"]["windows"], ma["perflow"]["target"], inputs, device,
                                           env.device, env.torch, log=log)
        save()
        report.divergence = run_divergence(plan, train_like, inputs, device, env.device, env.torch, log=log)
        report.complete = True
        save()
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    log(f"[gpu_smoke] done in {report.wall_s:.0f} s: {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, required=True,
                        help="full: SD 1.5's real component configs at 512 px (one GPU); tiny: the CPU stand-ins")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report, e.g. results/gpu/smoke.json")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="the gpu_smoke profile file")
    parser.add_argument("--params", type=Path, default=GPU_PARAMS, help="the GPU params (the training recipe)")
    args = parser.parse_args(argv)
    for var in OFFLINE:
        os.environ.setdefault(var, "1")
    try:
        run(args.size, args.out, args.work, args.keep_work, args.profile, args.params,
            log=lambda msg: print(msg, flush=True))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
