"""Bad inputs of the SD 1.5 trainer and evaluator fail in seconds, name what is missing and where it
goes, and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from replication.sd15 import evaluate, train
from replication.sd15.inputs import _PIPELINE_FILES

ROOT = Path(__file__).resolve().parents[1]


def fake_sd_folder(root: Path, prediction_type: str = "epsilon") -> Path:
    """A folder with the file layout of an SD 1.5 pipeline (empty weights: the checks run before loading)."""
    for alternatives, _ in _PIPELINE_FILES:
        (root / alternatives[0]).parent.mkdir(parents=True, exist_ok=True)
        (root / alternatives[0]).write_text("{}")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction_type}))
    return root


@pytest.fixture
def inputs(tmp_path):
    from replication.sd15.tiny import write_caption_folder, write_coco_folder

    return {"sd": fake_sd_folder(tmp_path / "sd"), "data": write_caption_folder(tmp_path / "data", n=2),
            "coco": write_coco_folder(tmp_path / "coco", n=3), "out": tmp_path / "out"}


def _train_yaml(tmp: Path, inputs, **over) -> Path:
    cfg = {"model_dir": str(inputs["sd"]), "data_dir": str(inputs["data"]), "output_dir": str(inputs["out"]),
           "resolution": 16, "mixed_precision": "no"}
    cfg.update(over)
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _eval_yaml(tmp: Path, inputs, **over) -> Path:
    cfg = {"coco_dir": str(inputs["coco"]), "output_dir": str(inputs["out"]), "n_prompts": 3,
           "models": {"teacher": {"path": str(inputs["sd"]), "scheduler": "ddim", "steps": [4]}}}
    cfg.update(over)
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fails(main, cfg: Path, capsys, *needles: str) -> None:
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_missing_unet_weights(tmp_path, inputs, capsys):
    (inputs["sd"] / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _fails(train.main, _train_yaml(tmp_path, inputs), capsys, "model_dir", str(inputs["sd"]),
           "unet/diffusion_pytorch_model.safetensors", "docs/gpu.md")
    assert not inputs["out"].exists()


def test_missing_weights_folder(tmp_path, inputs, capsys):
    _fails(train.main, _train_yaml(tmp_path, inputs, model_dir=str(tmp_path / "nowhere")), capsys,
           "model_dir", "nowhere", "missing the folder itself")
    assert not inputs["out"].exists()


def test_caption_folder_without_images_dir(tmp_path, inputs, capsys):
    (inputs["data"] / "images").rename(inputs["data"] / "pictures")
    _fails(train.main, _train_yaml(tmp_path, inputs), capsys, "data_dir", "images/", "captions.jsonl")
    assert not inputs["out"].exists()


def test_caption_naming_a_missing_image(tmp_path, inputs, capsys):
    (inputs["data"] / "images" / "0001.jpg").unlink()
    _fails(train.main, _train_yaml(tmp_path, inputs), capsys, "images/0001.jpg", "line 2")
    assert not inputs["out"].exists()


def test_unsupported_prediction_type(tmp_path, inputs, capsys):
    fake_sd_folder(inputs["sd"], prediction_type="v_prediction")
    _fails(train.main, _train_yaml(tmp_path, inputs), capsys, "prediction_type = 'v_prediction'",
           "scheduler_config.json", "epsilon")
    assert not inputs["out"].exists()


def test_bad_config_value_names_key(tmp_path, inputs, capsys):
    _fails(train.main, _train_yaml(tmp_path, inputs, perflow={"target": "x0"}), capsys,
           "train.yaml.perflow.target = 'x0'", "diff_eps")
    _fails(train.main, _train_yaml(tmp_path, inputs, method="perflow", ma={"weight": 1.0}), capsys,
           "train.yaml.ma", "has no effect")
    assert not inputs["out"].exists()


def test_missing_coco_annotations(tmp_path, inputs, capsys):
    (inputs["coco"] / "annotations" / "captions_val2017.json").unlink()
    _fails(evaluate.main, _eval_yaml(tmp_path, inputs), capsys, "coco_dir", "annotations/captions_val2017.json",
           "annotations_trainval2017.zip")
    assert not inputs["out"].exists()


def test_missing_coco_image(tmp_path, inputs, capsys):
    ann = json.loads((inputs["coco"] / "annotations" / "captions_val2017.json").read_text())
    first = min(ann["images"], key=lambda im: im["id"])
    (inputs["coco"] / "val2017" / first["file_name"]).unlink()
    _fails(evaluate.main, _eval_yaml(tmp_path, inputs), capsys, f"val2017/{first['file_name']}", "val2017.zip")
    assert not inputs["out"].exists()


def test_eval_model_folder_missing_and_too_few_steps(tmp_path, inputs, capsys):
    models = {"student": {"path": str(tmp_path / "no_student")}}
    _fails(evaluate.main, _eval_yaml(tmp_path, inputs, models=models), capsys, "models.student.path", "no_student")
    (inputs["sd"] / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PeRFlowScheduler", "num_time_windows": 4}))
    models = {"student": {"path": str(inputs["sd"]), "steps": [1, 4]}}
    _fails(evaluate.main, _eval_yaml(tmp_path, inputs, models=models), capsys, "models.student.steps", "4 windows")
    assert not inputs["out"].exists()


def test_command_line_fails_in_seconds(tmp_path, inputs):
    (inputs["sd"] / "vae" / "config.json").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "replication.sd15.train", "--config",
                           str(_train_yaml(tmp_path, inputs))], env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - tic < 15
    assert proc.returncode == 2 and "vae/config.json" in proc.stderr
    assert not inputs["out"].exists()


def test_the_gpu_pipeline_params_load_and_train_both_students():
    """Every section the GPU DVC project runs validates; PeRFlow and PeRFlow+MA are both trained and
    both evaluated, so the comparison needs no edit."""
    import yaml

    from replication.sd15.config import SD15EvalConfig, SD15TrainConfig, load_config

    path = "replication/gpu/params.yaml"
    methods = {load_config(SD15TrainConfig, path, s).method for s in ("sd15_train", "sd15_train_perflow")}
    assert methods == {"perflow", "perflow_ma"}
    evaluated = load_config(SD15EvalConfig, path, "sd15_eval").models
    outputs = {load_config(SD15TrainConfig, path, s).output_dir for s in ("sd15_train", "sd15_train_perflow")}
    assert {f"{o}/pipeline" for o in outputs} <= {m.path for m in evaluated.values()}
    stages = yaml.safe_load(open("replication/gpu/dvc.yaml"))["stages"]
    assert {"sd15_train", "sd15_train_perflow", "sd15_eval", "cifar10_teacher", "cifar10_fid"} <= set(stages)
