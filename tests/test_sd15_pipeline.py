"""SD 1.5 tier end to end on tiny offline stand-ins: train (PeRFlow + MA) through the user's entry point
(``python -m replication.stage sd15_train``),
load and sample the saved pipeline, evaluate it with the COCO code, and check that two processes
compute the same step as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from params_helpers import fill_defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    """A random-weight SD-style pipeline folder (tiny UNet, VAE, CLIP text encoder, real CLIP tokenizer)."""
    from replication.sd15.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory) -> Path:
    from replication.sd15.tiny import write_caption_folder

    return write_caption_folder(tmp_path_factory.mktemp("captions") / "data", n=5)


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory) -> Path:
    from replication.sd15.tiny import write_coco_folder

    return write_coco_folder(tmp_path_factory.mktemp("coco") / "coco", n=6)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def _train_config(tmp: Path, sd: Path, data: Path, out: str, **over) -> Path:
    """A params file whose ``sd15_train`` section is a 2-step PeRFlow + MA run on the tiny inputs."""
    cfg = {"model_dir": str(sd), "data_dir": str(data), "output_dir": str(tmp / out), "resolution": 16,
           "steps": 2, "batch_size": 2, "mixed_precision": "no", "checkpoint_every": 1,
           "dataloader_workers": 0, "ema_decay": 0.5,
           "debug_dump": str(tmp / f"{out}_dump.pt"),
           "student": {"method": "perflow", "windows": 4, "ma": True, "seeds": [0]},
           "perflow": {"teacher_steps": 2, "cfg_drop": 0.5},
           "ma": {"weight": 0.5, "substeps": 2, "n_probes": 2, "divergence": "hutchinson_fd", "fd_step": 1e-2},
           "warmup": 0, "lr": 1e-3}
    cfg.update(over)
    path = tmp / f"{out}.yaml"
    from replication.sd15.config import SD15TrainConfig

    path.write_text(yaml.safe_dump({"sd15_train": fill_defaults(SD15TrainConfig, cfg)}))
    return path


def _stage_command(params: Path) -> list[str]:
    return ["-m", "replication.stage", "sd15_train", "--params", str(params), "--quiet"]


@pytest.fixture(scope="module")
def trained(tiny_sd, caption_folder, tmp_path_factory):
    """One 2-step PeRFlow + MA run of ``python -m replication.stage sd15_train`` (subprocess)."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = _train_config(tmp, tiny_sd, caption_folder, "run")
    proc = subprocess.run([sys.executable, *_stage_command(cfg)],
                          cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_training_writes_pipeline_delta_weights_checkpoints_and_log(trained, tiny_sd):
    from safetensors.torch import load_file

    out = trained / "run"
    # checkpoints_total_limit 1 (the default, for the disk): the newest only, kept after the run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2] and {"tm", "ma", "total"} <= set(log[0])
    assert abs(log[0]["total"] - (log[0]["tm"] + 0.5 * log[0]["ma"])) < 1e-5
    # the saved UNet is the EMA student; the delta weights are saved UNet - teacher UNet
    student = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    teacher = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    delta = load_file(out / "delta_weights.safetensors")
    assert set(delta) == set(teacher)
    assert max((student[k] - teacher[k] - delta[k]).abs().max() for k in delta) < 1e-6
    assert max(delta[k].abs().max() for k in delta) > 0  # training moved the weights
    sched = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PeRFlowScheduler" and sched["prediction_type"] == "diff_eps"
    assert sched["num_time_windows"] == 4
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["scheduler"] == ["replication.sd15.scheduler", "PeRFlowScheduler"]


def test_saved_pipeline_samples_in_four_steps(trained):
    from diffusers import StableDiffusionPipeline

    import replication.sd15.scheduler  # noqa: F401  (registers the scheduler class for diffusers)

    pipe = StableDiffusionPipeline.from_pretrained(trained / "run" / "pipeline", safety_checker=None)
    assert type(pipe.scheduler).__name__ == "PeRFlowScheduler"
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda mod, args: calls.append(float(args[1].flatten()[0])))
    images = pipe("a cat", num_inference_steps=4, height=16, width=16, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3) and float(images.std()) > 0
    assert calls == [1000.0, 750.0, 500.0, 250.0]  # one step per window, starting at each window start


def test_a_pipeline_saved_before_the_scheduler_moved_still_loads(trained, tmp_path):
    """Folders saved when the scheduler lived in ``marflow_core`` name that module in
    ``model_index.json``; the tier's loader (the evaluator's) gets the class from its new home."""
    import shutil

    from replication.sd15.components import load_sd_pipeline
    from replication.sd15.scheduler import PeRFlowScheduler

    old = shutil.copytree(trained / "run" / "pipeline", tmp_path / "old")
    index = json.loads((old / "model_index.json").read_text())
    index["scheduler"] = ["marflow_core.scheduler", "PeRFlowScheduler"]
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = load_sd_pipeline(old)
    assert isinstance(pipe.scheduler, PeRFlowScheduler) and pipe.scheduler.config.num_time_windows == 4


def test_resume_uses_the_last_checkpoint_and_refuses_a_changed_config(trained, tiny_sd, caption_folder, capsys):
    """The newest checkpoint is the one resumed; a run dir of another config is refused, key named."""
    from replication import registry, stage
    from replication.config import load_params
    from replication.sd15 import train

    cfg = registry.section(load_params(trained / "run.yaml"), "sd15_train")
    assert train.latest_checkpoint(Path(cfg.output_dir)).name == "checkpoint-2"
    student = {"method": "perflow", "windows": 4, "ma": True, "seeds": [1]}
    changed = _train_config(trained, tiny_sd, caption_folder, "run", student=student)
    assert stage.main(["sd15_train", "--params", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "student.seeds = [1]" in err and "student.seeds = [0]" in err


def test_two_processes_match_one_process(trained, tiny_sd, caption_folder):
    """``accelerate launch`` with 2 CPU processes (gloo) x batch 1 == 1 process x batch 2 at step 1."""
    cfg = _train_config(trained, tiny_sd, caption_folder, "ddp", batch_size=1, steps=1)
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000),
           *_stage_command(cfg)]
    proc = subprocess.run(cmd, cwd=trained, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(trained / "run_dump.pt"), torch.load(trained / "ddp_dump.pt")
    assert (one["processes"], two["processes"]) == (1, 2)
    for key in ("tm", "ma", "total"):
        assert one["parts"][key] == pytest.approx(two["parts"][key], rel=1e-5, abs=1e-7)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
    assert float((one["grad"] - two["grad"]).norm()) < 1e-4 * float(one["grad"].norm())
    assert float(one["grad"].norm()) > 0


def test_coco_evaluation_of_student_and_teacher(trained, tiny_sd, coco_folder, tmp_path):
    from replication.sd15.config import ModelSpec, SD15EvalConfig
    from replication.sd15.evaluate import evaluate
    from replication.sd15.metrics import register_extractor
    from replication.sd15.tiny import register_tiny_clip, tiny_fid_extractor_class

    register_extractor("tiny-test-fid", tiny_fid_extractor_class())
    cfg = SD15EvalConfig(
        coco_dir=str(coco_folder), output_dir=str(tmp_path / "eval"), n_prompts=4, resolution=16, batch_size=3,
        fid_extractor="tiny-test-fid", clip_model=register_tiny_clip(), clip_pretrained="",
        mixed_precision="no",
        models={"student": ModelSpec(path=str(trained / "run" / "pipeline"), steps=[4], guidance=[1.0]),
                "teacher": ModelSpec(path=str(tiny_sd), scheduler="ddim", steps=[1, 2], guidance=[2.0])})
    metrics = evaluate(cfg, device=torch.device("cpu"), progress=False)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    rows = {(r["model"], r["steps"]): r for r in saved["rows"]}
    assert set(rows) == {("student", 4), ("teacher", 1), ("teacher", 2)}
    assert all(r["fid"] > 0 and -1 <= r["clip"] <= 1 for r in rows.values())
    # the 4 lowest image ids (each with its first caption in the file's order), one image per seed
    ann = json.loads((coco_folder / "annotations" / "captions_val2017.json").read_text())
    ids = sorted(img["id"] for img in ann["images"])[:4]
    names = sorted(p.name for p in (tmp_path / "eval" / "images" / "student" / "steps_4_guidance_1").iterdir())
    assert names == [f"{i:012d}.png" for i in ids]
    table = (tmp_path / "eval" / "comparison.md").read_text()
    assert "| marflow (this run) | student | 4 | 1 |" in table and "| 22.97 | 0.294 |" in table
