"""CIFAR-10 tier: the pickle loader on a tiny stand-in in the standard format, the UNet layout, the
params sections and their checks, and a 2-step smoke of every ``python -m replication.stage``
cifar10 stage on CPU (tiny UNet, tiny random FID extractor)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from params_helpers import fill_defaults, with_value

from marflow_core import InvalidParameter, ReflowPairConfig
from marflow_core.unet import UNetConfig, UNetVelocity
from replication import registry
from replication.cifar10 import tier
from replication.cifar10.config import Cifar10Config, ddpm_unet
from replication.cifar10.data import (
    CifarFileMissing,
    load_cifar10,
    load_cifar10_uint8,
    load_label_names,
    to_uint8,
    write_batch,
)
from replication.cifar10.references import load_cifar10_references
from replication.config import ConfigError, from_dict, load_params
from replication.stage import main

ROOT = Path(__file__).resolve().parents[1]
GPU_PARAMS = "replication/gpu/params.yaml"
TRAINING_STAGES = ("cifar10_teacher", "cifar10_students")

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar(root, per_batch=3, seed=0):
    """Five training batches and a test batch of random images, plus batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        write_batch(folder / name, images, labels)
        written[name] = (images, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072}, fh)
    return written


def test_loader_shapes_range_labels_and_layout(tmp_path):
    written = make_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (15,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    first = written["data_batch_1"][0][0]
    # the standard row layout: the first 1024 bytes are the red plane, row-major
    raw = first.reshape(-1)
    assert x[0, 0, 0, 1].item() == pytest.approx(raw[1] / 127.5 - 1, abs=1e-6)
    assert x[0, 1, 2, 3].item() == pytest.approx(raw[1024 + 2 * 32 + 3] / 127.5 - 1, abs=1e-6)
    expected_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y.tolist() == expected_labels
    u8, _ = load_cifar10_uint8(tmp_path, "train")
    assert torch.equal(to_uint8(x), u8) and u8[-1].numpy().tolist() == written["data_batch_5"][0][-1].tolist()
    xt, yt = load_cifar10(tmp_path, "test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]
    assert load_label_names(tmp_path) == NAMES
    assert torch.equal(load_cifar10(tmp_path)[0], x)  # deterministic


def test_loader_names_the_missing_file_and_where_it_goes(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CifarFileMissing) as err:
        load_cifar10(tmp_path, "train")
    message = str(err.value)
    assert "data_batch_3" in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "\n" not in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(CifarFileMissing, match="test_batch"):
        load_cifar10(tmp_path / "nowhere", "test")


def test_references_have_sources_and_match_the_design_numbers():
    refs = load_cifar10_references()
    fids = {(e["method"], e["fields"]["solver"]): e["fid"] for e in refs["entries"]}
    assert fids[("1-Rectified Flow", "RK45 (adaptive)")] == 2.58 and fids[("2-Rectified Flow (+Distill)", "Euler")] == 4.85
    assert fids[("2-Rectified Flow", "Euler")] == 12.21  # undistilled, one Euler step: Liu et al. Table 1(a)
    assert all(e["source"] and e["protocol_spec"]["samples"] == 50000 for e in refs["entries"])
    assert fids[("reflow / PeRFlow + MA (paper)", "unknown")] == "unknown"




def complete(params: dict) -> dict:
    """Every section with the code's defaults written out, as a params file must hold them."""
    from replication.cifar10.config import SECTIONS

    return {name: fill_defaults(SECTIONS[name], cfg) for name, cfg in params.items()}


def tiny_params(tmp_path, extractor="x"):
    """Every cifar10 section at toy size: two training steps, a 4-pair bank, tiny FID."""
    return complete({
        "cifar10": {
            "seed": 0, "device": "cpu",
            "checkpoint_dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "results"),
            "data": {"root": str(tmp_path / "data"), "n_train": 10, "hflip": True},
            "model": {"widths": [8, 16], "attention_levels": [1], "layers_per_block": 1, "norm_groups": 4,
                      "attention_head_dim": None, "dropout": 0.1},
        },
        "cifar10_teacher": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 0, "checkpoint_every": 1,
                            "log_every": 1},
        "cifar10_pairs": {"n_pairs": 4, "shard_size": 2, "steps": 1, "solver": "euler", "batch_size": 4},
        "cifar10_students": {
            "steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 0, "log_every": 1,
            "perflow": {"teacher_steps": 1, "solver": "euler"},
            "ma": {"weight": 0.1, "substeps": 1, "divergence": "hutchinson_fd", "n_probes": 1},
            "students": {
                "reflow": {"method": "reflow"},
                "perflow2_ma": {"method": "perflow", "windows": 2, "ma": True, "seeds": [0, 1]},
            },
        },
        "cifar10_fid": {"n_samples": 6, "n_reference": 8, "nfe": [1, 2], "teacher_nfe": [2], "batch_size": 4,
                        "feature_extractor": extractor, "grid_images": 4, "save_cpu_ram": True},
    })


def validate(params):
    registry.validate_all(params, GPU_PARAMS)


def register_tiny_extractor(name):
    """The SD tier's stand-in for Inception (a fixed random projection of pooled pixels; weights offline)."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from replication.sd15.tiny import tiny_fid_extractor_class

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, tiny_fid_extractor_class())


def run_stage(name, params_path, capsys):
    """``python -m replication.stage NAME --params PATH`` in this process (where the tiny extractor
    is registered); returns the printed JSON summary."""
    capsys.readouterr()
    assert main([name, "--params", str(params_path), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"stage {name}: ")
    return json.loads(line[len(f"stage {name}: "):].rsplit(" (", 1)[0])


def test_every_stage_runs_through_the_stage_runner_on_cpu(tmp_path, capsys):
    make_cifar(tmp_path / "data", per_batch=2)
    register_tiny_extractor("cifar10-test-tiny")
    params = tiny_params(tmp_path, "cifar10-test-tiny")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "replication.stage", "cifar10_teacher", "--params", str(path),
                           "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('stage cifar10_teacher: {"steps": 2,')
    teacher_ckpt = tmp_path / "ckpt" / "teacher" / "final.pt"
    assert isinstance(torch.load(teacher_ckpt, weights_only=True)["model"]["unet.conv_in.weight"], torch.Tensor)
    assert run_stage("cifar10_pairs", path, capsys) == {"shards": 2, "n_pairs": 4}
    assert len(list((tmp_path / "ckpt" / "pairs").glob("pairs_seed*.pt"))) == 2
    students = run_stage("cifar10_students", path, capsys)
    assert set(students) == {"reflow", "perflow2_ma"} and set(students["perflow2_ma"]) == {"seed0", "seed1"}
    assert "ma" in students["perflow2_ma"]["seed0"]["last"] and "ma" not in students["reflow"]["seed0"]["last"]
    assert "fm" not in students["reflow"]["seed0"]["last"]  # distillation, not the teacher's loss
    result = run_stage("cifar10_fid", path, capsys)
    rows = {(r["model"], r["seed"], r["nfe"]): r for r in result["rows"]}
    assert set(rows) == {("teacher", None, 2), ("reflow", 0, 1), ("reflow", 0, 2), ("perflow2_ma", 0, 1),
                         ("perflow2_ma", 0, 2), ("perflow2_ma", 1, 1), ("perflow2_ma", 1, 2)}
    assert rows[("perflow2_ma", 1, 1)]["crosses_windows"] and not rows[("perflow2_ma", 1, 2)]["crosses_windows"]
    assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 for r in rows.values())
    saved = json.loads((tmp_path / "results" / "fid.json").read_text())
    assert saved["rows"] == result["rows"] and saved["references"]
    assert (tmp_path / "results" / "samples_reflow_seed0_nfe2.png").is_file()

    # the same params resume to the end: nothing is retrained
    before = teacher_ckpt.read_bytes()
    assert run_stage("cifar10_teacher", path, capsys)["steps"] == 2
    assert teacher_ckpt.read_bytes() == before
    # a changed key takes effect: the students' runs start over with it
    reflow_ckpt = tmp_path / "ckpt" / "students" / "reflow" / "seed0" / "final.pt"
    old = torch.load(reflow_ckpt, weights_only=True)
    path.write_text(yaml.safe_dump(with_value(params, ("cifar10_students", "lr"), 5e-4)))
    run_stage("cifar10_students", path, capsys)
    new = torch.load(reflow_ckpt, weights_only=True)
    assert new["config"]["lr"] == 5e-4 and old["config"]["lr"] == 1e-3
    assert not torch.equal(new["model"]["unet.conv_in.weight"], old["model"]["unet.conv_in.weight"])
    # an unfinished teacher is never distilled
    state = torch.load(teacher_ckpt, weights_only=True)
    torch.save({**state, "step": 1}, teacher_ckpt)
    with pytest.raises(RuntimeError, match="stopped at step 1 of 2"):
        main(["cifar10_pairs", "--params", str(path), "--quiet"])


def test_stage_command_line_validates_the_tiny_params(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "replication.stage", "cifar10_students", "--params", str(path),
                           "--check-only"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    listing = subprocess.run([sys.executable, "-m", "replication.stage", "--list"], capture_output=True,
                             text=True, cwd=ROOT).stdout
    for name in ("cifar10_teacher", "cifar10_pairs", "cifar10_students", "cifar10_fid"):
        assert f"{name} [cifar10, {GPU_PARAMS}]" in listing


def test_cuda_without_cuda_is_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tier, "make_model", lambda *a: pytest.fail("a model was built"))
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump(with_value(tiny_params(tmp_path), ("cifar10", "device"), "cuda")))
    for name in ("cifar10_teacher", "cifar10_fid"):
        assert main([name, "--params", str(path), "--quiet"]) == 2
        assert "cifar10.device = 'cuda': CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_pairs_batch_size_reaches_the_teacher_solve(tmp_path):
    seen = []

    def teacher(x, t):
        seen.append(x.shape[0])
        return torch.zeros_like(x)

    cfg = from_dict(Cifar10Config, tiny_params(tmp_path)["cifar10"], "cifar10")
    pairs = ReflowPairConfig(n_pairs=10, shard_size=10, steps=1, solver="euler", batch_size=4)
    paths = tier.pair_bank(cfg, pairs, teacher, {"run": None, "step": 0}, progress=False)
    assert seen == [4, 4, 2] and len(paths) == 1
    with pytest.raises(InvalidParameter, match="batch_size"):
        ReflowPairConfig(batch_size=0)
    assert ReflowPairConfig().batch_size == 4096  # the other tiers' solve is unchanged


def test_ddpm_layout_is_the_old_tiers_network():
    """The core adapter with ``ddpm_unet()`` builds, weight for weight, the ``UNet2DModel`` the tier
    built before (DDPM CIFAR-10: single-head attention at 16x16, dropout 0.1), on images."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNetVelocity(3, 32, ddpm_unet())
    torch.manual_seed(0)
    old = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                      layers_per_block=2, norm_num_groups=32, dropout=0.1, attention_head_dim=None,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    mine, theirs = model.unet.state_dict(), old.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert 35e6 < sum(p.numel() for p in model.parameters()) < 37e6
    attention = [m for m in model.modules() if type(m).__name__ == "Attention"]
    assert attention and all(a.heads == 1 for a in attention)
    assert {m.dropout.p for m in model.modules() if type(m).__name__ == "ResnetBlock2D"} == {0.1}
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert model(x, torch.tensor([0.2, 0.9])).shape == (2, 3, 32, 32)


def test_unet_config_new_fields_are_validated():
    assert UNetConfig().attention_head_dim == 8 and UNetConfig().dropout == 0.0  # the other tiers' nets
    with pytest.raises(InvalidParameter, match="dropout"):
        UNetConfig(dropout=1.0)
    with pytest.raises(InvalidParameter, match="attention_head_dim"):
        UNetConfig(widths=[32, 48], attention_head_dim=32)  # 48 (mid block) is not a multiple
    with pytest.raises(InvalidParameter, match="attention_head_dim"):
        UNetConfig(attention_head_dim=0)
    heads = [m.heads for m in UNetVelocity(1, 8, UNetConfig(widths=[8, 16], norm_groups=4,
                                                            attention_head_dim=4)).modules()
             if type(m).__name__ == "Attention"]
    assert heads and set(heads) == {4}


def test_config_errors_name_the_key(tmp_path):
    base = tiny_params(tmp_path)
    validate(base)
    students = ("cifar10_students", "students")
    cases = [
        (with_value(base, (*students, "s"), {"method": "reflow", "windows": 4, "ma": False, "seeds": [0]}),
         r"cifar10_students.students.s.windows = 4: reflow uses K = 1"),
        (with_value(base, (*students, "s"), {"method": "flowmap", "windows": 1, "ma": False, "seeds": [0]}),
         r"cifar10_students.students.s.method"),
        (with_value(base, (*students, "teacher"), {"method": "reflow"}), r"cifar10_students.students.teacher"),
        (with_value(base, ("cifar10_students", "ma"), {
            **{k: v for k, v in base["cifar10_students"]["ma"].items() if k not in ("fd_step", "probe_kind")},
            "divergence": "exact", "n_probes": 2}),
         r"cifar10_students.ma.n_probes"),
        (with_value(base, ("cifar10_students", "dropout"), 0.1), r"cifar10_students.dropout = 0.1: must be 0"),
        (with_value(base, ("cifar10", "model", "attention_head_dim"), 3), r"cifar10.model.attention_head_dim = 3"),
        (with_value(base, ("cifar10", "model", "widths"), [8, 16, 16, 16, 16, 16, 16]), r"cifar10.model.widths"),
        (with_value(base, ("cifar10_teacher", "optimizer"), "sgd"), r"cifar10_teacher.optimizer = 'sgd'"),
        (with_value(base, ("cifar10_pairs", "batch_size"), 0), r"cifar10_pairs.batch_size = 0"),
        (with_value(base, ("cifar10_fid", "nfe"), [0]), r"cifar10_fid.nfe"),
        (with_value(base, ("cifar10", "seeds"), 1), r"cifar10.seeds = 1: unknown key"),
        (with_value(base, ("cifar10", "device"), "gpu"), r"cifar10.device = 'gpu'"),
        ({**base, "cifar10_extra": {}}, r"cifar10_extra = \{\}: unknown params section"),
    ]
    for params, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(params)


def test_keys_without_effect_are_refused(tmp_path):
    base = tiny_params(tmp_path)
    only_perflow = with_value(base, ("cifar10_students", "students"), {"p": {"method": "perflow", "windows": 2, "ma": False, "seeds": [0]}})
    no_pairs = {k: v for k, v in only_perflow.items() if k != "cifar10_pairs"}
    no_ma = {**no_pairs, "cifar10_students": {k: v for k, v in no_pairs["cifar10_students"].items()
                                              if k not in ("ma", "t_max")}}
    validate(no_ma)  # PeRFlow without MA: no pair bank, no MA settings
    with pytest.raises(ConfigError, match=r"cifar10_pairs = .*has no effect: no student's method uses teacher_pairs"):
        validate({**no_ma, "cifar10_pairs": base["cifar10_pairs"]})
    with pytest.raises(ConfigError, match=r"cifar10_students.ma = .*has no effect: no student has ma: true"):
        validate(with_value(no_ma, ("cifar10_students", "ma"), {"weight": 0.1}))
    with pytest.raises(ConfigError, match=r"cifar10_students.t_max = 0.9: has no effect"):
        validate(with_value(no_ma, ("cifar10_students", "t_max"), 0.9))
    reflow_ma = {"method": "reflow", "windows": 1, "ma": True, "ma_weight": None, "ma_substeps": None, "seeds": [0]}
    only_reflow = with_value(base, ("cifar10_students", "students"), {"r": reflow_ma})
    with pytest.raises(ConfigError, match=r"cifar10_students.perflow = .*has no effect"):
        validate(only_reflow)
    with pytest.raises(ConfigError, match=r"students.r.ma_weight = 0.5: has no effect"):
        validate(with_value(base, (*("cifar10_students", "students"), "r"), {"method": "reflow", "windows": 1, "ma": False,
                                                                                "ma_weight": 0.5, "seeds": [0]}))


def test_the_gpu_params_sections_validate_and_match_dvc():
    """The paper-protocol sections of ``replication/gpu/params.yaml`` validate (devices set to cpu),
    and every cifar10 stage of its DVC project runs the stage runner on exactly its sections."""
    params = {k: v for k, v in load_params(ROOT / GPU_PARAMS).items() if k.startswith("cifar10")}
    assert params["cifar10"]["device"] == "cuda"
    params = with_value(params, ("cifar10", "device"), "cpu")
    validate(params)
    assert registry.section(params, "cifar10_fid").n_samples == 50000
    assert registry.section(params, "cifar10").model == ddpm_unet()
    students = registry.section(params, "cifar10_students").students
    assert {(s.method, s.windows, s.ma) for s in students.values()} == {
        ("reflow", 1, False), ("reflow", 1, True), ("perflow", 4, False), ("perflow", 4, True)}
    dvc = yaml.safe_load((ROOT / "replication" / "gpu" / "dvc.yaml").read_text())["stages"]
    tier_stages = registry.tiers()["cifar10"].stages
    assert {s.name for s in tier_stages} <= set(dvc)
    for spec in tier_stages:
        stage = dvc[spec.name]
        launcher = "accelerate launch" if spec.name in TRAINING_STAGES else "python"  # training spans GPUs
        assert stage["cmd"] == f"{launcher} -m replication.stage {spec.name}"
        (listed,) = stage["params"]
        assert listed == {GPU_PARAMS: list(spec.sections)}, spec.name
        assert "replication/cifar10" in stage["deps"]
    outs = {next(iter(o)) for s in dvc.values() for o in s.get("outs", [])}
    assert set(registry.tiers()["cifar10"].persistent_outputs) <= outs
