"""Bad inputs of the SD 1.5 trainer and evaluator fail in seconds, name what is missing and where it
goes, and write nothing; the stages run through the one entry point, ``python -m replication.stage``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from params_helpers import fill_defaults

from replication import stage
from replication.sd15.config import SD15EvalConfig, SD15TrainConfig
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
    """A params file whose ``sd15_train`` section is a small run on ``inputs``."""
    cfg = {"model_dir": str(inputs["sd"]), "data_dir": str(inputs["data"]), "output_dir": str(inputs["out"]),
           "resolution": 16, "mixed_precision": "no",
           "student": {"method": "perflow", "windows": 4, "ma": True}}
    cfg.update(over)
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump({"sd15_train": fill_defaults(SD15TrainConfig, cfg)}))
    return path


def _eval_yaml(tmp: Path, inputs, **over) -> Path:
    """A params file whose ``sd15_eval`` section scores the fake teacher on ``inputs``."""
    cfg = {"coco_dir": str(inputs["coco"]), "output_dir": str(inputs["out"]), "n_prompts": 3,
           "models": {"teacher": {"path": str(inputs["sd"]), "scheduler": "ddim", "steps": [4]}}}
    cfg.update(over)
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump({"sd15_eval": fill_defaults(SD15EvalConfig, cfg)}))
    return path


def _fails(name: str, params: Path, capsys, *needles: str, check_only: bool = False) -> None:
    """``python -m replication.stage NAME --params PARAMS`` exits 2 with one line naming each needle."""
    assert stage.main([name, "--params", str(params), *(["--check-only"] if check_only else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_missing_unet_weights(tmp_path, inputs, capsys):
    (inputs["sd"] / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _fails("sd15_train", _train_yaml(tmp_path, inputs), capsys, "model_dir", str(inputs["sd"]),
           "unet/diffusion_pytorch_model.safetensors", "docs/gpu.md")
    assert not inputs["out"].exists()


def test_missing_weights_folder(tmp_path, inputs, capsys):
    _fails("sd15_train", _train_yaml(tmp_path, inputs, model_dir=str(tmp_path / "nowhere")), capsys,
           "model_dir", "nowhere", "missing the folder itself")
    assert not inputs["out"].exists()


def test_caption_folder_without_images_dir(tmp_path, inputs, capsys):
    (inputs["data"] / "images").rename(inputs["data"] / "pictures")
    _fails("sd15_train", _train_yaml(tmp_path, inputs), capsys, "data_dir", "images/", "captions.jsonl")
    assert not inputs["out"].exists()


def test_caption_naming_a_missing_image(tmp_path, inputs, capsys):
    (inputs["data"] / "images" / "0001.jpg").unlink()
    _fails("sd15_train", _train_yaml(tmp_path, inputs), capsys, "images/0001.jpg", "line 2")
    assert not inputs["out"].exists()


def test_unsupported_prediction_type(tmp_path, inputs, capsys):
    fake_sd_folder(inputs["sd"], prediction_type="v_prediction")
    _fails("sd15_train", _train_yaml(tmp_path, inputs), capsys, "prediction_type = 'v_prediction'",
           "scheduler_config.json", "epsilon")
    assert not inputs["out"].exists()


def test_bad_config_value_names_key(tmp_path, inputs, capsys):
    _fails("sd15_train", _train_yaml(tmp_path, inputs, perflow={"target": "x0"}), capsys,
           "sd15_train.perflow.target = 'x0'", "diff_eps")
    _fails("sd15_train", _train_yaml(tmp_path, inputs, student={"method": "perflow", "windows": 4, "ma": False},
                                     ma={"weight": 1.0}), capsys, "sd15_train.ma", "has no effect")
    assert not inputs["out"].exists()


def test_missing_coco_annotations(tmp_path, inputs, capsys):
    (inputs["coco"] / "annotations" / "captions_val2017.json").unlink()
    _fails("sd15_eval", _eval_yaml(tmp_path, inputs), capsys, "coco_dir", "annotations/captions_val2017.json",
           "annotations_trainval2017.zip")
    assert not inputs["out"].exists()


def test_missing_coco_image(tmp_path, inputs, capsys):
    ann = json.loads((inputs["coco"] / "annotations" / "captions_val2017.json").read_text())
    first = min(ann["images"], key=lambda im: im["id"])
    (inputs["coco"] / "val2017" / first["file_name"]).unlink()
    _fails("sd15_eval", _eval_yaml(tmp_path, inputs), capsys, f"val2017/{first['file_name']}", "val2017.zip")
    assert not inputs["out"].exists()


def test_eval_model_folder_missing_and_too_few_steps(tmp_path, inputs, capsys):
    models = {"student": {"path": str(tmp_path / "no_student")}}
    _fails("sd15_eval", _eval_yaml(tmp_path, inputs, models=models), capsys, "models.student.path", "no_student")
    (inputs["sd"] / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PeRFlowScheduler", "num_time_windows": 4}))
    models = {"student": {"path": str(inputs["sd"]), "steps": [1, 4]}}
    _fails("sd15_eval", _eval_yaml(tmp_path, inputs, models=models), capsys, "models.student.steps", "4 windows")
    assert not inputs["out"].exists()


def test_command_line_fails_in_seconds(tmp_path, inputs):
    (inputs["sd"] / "vae" / "config.json").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "replication.stage", "sd15_train", "--params",
                           str(_train_yaml(tmp_path, inputs))], env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - tic < 15
    assert proc.returncode == 2 and "vae/config.json" in proc.stderr
    assert not inputs["out"].exists()


def test_the_gpu_pipeline_params_load_and_train_both_students():
    """Every section the GPU DVC project runs validates; PeRFlow and PeRFlow+MA are both trained and
    both evaluated, so the comparison needs no edit, and the two runs differ only in the MA term."""
    from replication import registry
    from replication.config import load_params

    path = "replication/gpu/params.yaml"
    params = load_params(ROOT / path)
    # other tiers' sections of this file name CUDA devices, which this machine may lack
    on_cpu = {k: ({**v, "device": "cpu"} if isinstance(v, dict) and "device" in v else v) for k, v in params.items()}
    registry.validate_all(on_cpu, path)
    train = {s: registry.section(params, s) for s in ("sd15_train", "sd15_train_perflow")}
    assert {t.student.ma for t in train.values()} == {True, False}
    assert {t.student.method for t in train.values()} == {"perflow"}
    evaluated = registry.section(params, "sd15_eval").models
    assert {f"{t.output_dir}/pipeline" for t in train.values()} <= {m.path for m in evaluated.values()}
    ma_keys = {"student", "output_dir", "ma", "ma_fd_fp32"}
    same = [{k: v for k, v in params[s].items() if k not in ma_keys} for s in train]
    assert same[0] == same[1]
    baseline = {k: v for k, v in params["sd15_train_perflow"]["student"].items()}
    assert params["sd15_train"]["student"] == {**baseline, "ma": True, "ma_weight": None, "ma_substeps": None}
    stages = yaml.safe_load(open(ROOT / "replication/gpu/dvc.yaml"))["stages"]
    assert {"sd15_train", "sd15_train_perflow", "sd15_eval", "cifar10_teacher", "cifar10_fid"} <= set(stages)
    for name in ("sd15_train", "sd15_train_perflow", "sd15_eval"):
        assert stages[name]["cmd"].split("#")[0].split()[-3:] == ["-m", "replication.stage", name]
        assert registry.tier_of(name).params_file == path


def test_the_sd15_stages_are_registered():
    from replication import registry

    tier = registry.tiers()["sd15"]
    assert [s.name for s in tier.stages] == ["sd15_train", "sd15_train_perflow", "sd15_eval"]
    assert all(callable(s.function()) for s in tier.stages)
    assert set(tier.sections) == {"sd15_train", "sd15_train_perflow", "sd15_eval"}


@pytest.mark.parametrize(("over", "needles"), [
    ({"ma": {"divergence": "exact"}}, ("sd15_train.ma.divergence = 'exact'", "hutchinson_fd")),
    ({"ma": {"logdet": "discrete", "solver": "euler"}}, ("sd15_train.ma.logdet = 'discrete'",)),
    ({"ma": {"divergence": "hutchinson_fd", "batch_fraction": 0.5}}, ("sd15_train.ma.batch_fraction = 0.5",)),
    ({"ma": {"divergence": "hutchinson_fd", "window_weights": [1.0, 1.0]}},
     ("sd15_train.ma.window_weights", "one weight per window (4)")),
    ({"student": {"method": "reflow", "ma": True}}, ("sd15_train.student.method = 'reflow'", "perflow")),
    ({"student": {"method": "perflow", "windows": 3}}, ("sd15_train.student.windows = 3", "divide")),
    ({"student": {"method": "perflow", "windows": 4, "seeds": [0, 1]}}, ("sd15_train.student.seeds",)),
    ({"student": {"method": "perflow", "windows": 4, "ma": True}, "ma": {"divergence": "hutchinson"},
      "ma_fd_fp32": True}, ("sd15_train.ma_fd_fp32", "has no effect", "hutchinson_fd")),
    ({"mixed_precision": "no", "ma_fd_fp32": False}, ("sd15_train.ma_fd_fp32", "mixed_precision = 'no'")),
    ({"student": {"method": "perflow", "windows": 4}, "ma_fd_fp32": True},
     ("sd15_train.ma_fd_fp32", "student.ma is false")),
    ({"snapshot_every": 10}, ("sd15_train.snapshot_every", "has no effect")),
    ({"optimizer": "sgd"}, ("sd15_train.optimizer = 'sgd'",)),
    ({"perflow": {"discrete_timesteps": 10}}, ("sd15_train.perflow.discrete_timesteps = 10", "multiple")),
    ({"optim": {"lr": 1e-4}}, ("sd15_train.optim", "unknown key")),
    ({"method": "perflow_ma"}, ("sd15_train.method", "unknown key")),
])
def test_what_sd_cannot_do_is_refused_naming_the_key(tmp_path, inputs, capsys, over, needles):
    """Keys of the shared configs (``MAConfig``, ``StudentSpec``, ``TrainConfig``) that SD cannot
    honour, and the keys of the old layout, stop at validation (``--check-only`` too)."""
    base = {"mixed_precision": "fp16"} if "mixed_precision" not in over else {}
    _fails("sd15_train", _train_yaml(tmp_path, inputs, **{**base, **over}), capsys, *needles, check_only=True)
    assert not inputs["out"].exists()


def test_check_only_validates_the_params_without_touching_inputs(tmp_path, inputs, capsys):
    """``--check-only`` validates the section (inputs are checked when the stage runs: the registry
    validates every stage of a params file, and the evaluation's inputs appear only after training)."""
    assert stage.main(["sd15_train", "--params", str(_train_yaml(tmp_path, inputs)), "--check-only"]) == 0
    assert "valid" in capsys.readouterr().out
