"""params.yaml validation: bad values stop a stage before any work, naming the key and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from params_helpers import with_value

from replication import registry
from replication.config import ConfigError, load_params
from replication.profile import apply_profile
from replication.stage import main

STAGES = {name: s for name, s in registry.stages().items()
          if registry.tier_of(name).params_file == "params.yaml"}  # the CPU tiers (root dvc.yaml)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    return load_params(ROOT / "params.yaml")


def test_committed_params_and_profiles_are_valid(params, tmp_path):
    registry.validate_all(params)
    for name in registry.sections("params.yaml"):
        registry.section(params, name)
    for stage in STAGES.values():
        stage.validate(params)
    tiny_path = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    tiny_path.write_text(original)
    merged = apply_profile("tiny", tiny_path, ROOT / "replication" / "profiles")
    assert merged["profile"] == "tiny"
    assert load_params(tiny_path)["toy2d_train"]["steps"] < params["toy2d_train"]["steps"]
    # the switch is one line: every comment and every other line of params.yaml stays as it was
    changed = [(a, b) for a, b in zip(original.splitlines(), tiny_path.read_text().splitlines(),
                                      strict=True) if a != b]
    assert changed == [("profile: default", "profile: tiny")]
    apply_profile("default", tiny_path, ROOT / "replication" / "profiles")
    assert tiny_path.read_text() == original


BAD_VALUES = [
    (("toy2d_train", "steps"), -5, "toy2d_train.steps = -5"),
    (("toy2d_train", "students", "perflow", "windows"), 0, "toy2d_train.students.perflow.windows = 0"),
    (("toy2d_train", "students", "perflow", "method"), "flowmatch",
     "toy2d_train.students.perflow.method = 'flowmatch'"),
    (("toy2d_train", "ma", "weight"), -0.5, "toy2d_train.ma.weight = -0.5"),
    (("toy2d_train", "students", "reflow_ma", "ma_weight"), -1.0,
     "toy2d_train.students.reflow_ma.ma_weight = -1.0"),
    (("toy2d_train", "perflow", "teacher_steps"), 0, "toy2d_train.perflow.teacher_steps = 0"),
    (("toy2d_eval", "nfe"), [1, -2], "toy2d_eval.nfe[1] = -2: an NFE (number of steps) must be >= 1"),
    (("toy2d_train", "lr"), "fast", "toy2d_train.lr = 'fast'"),
    (("toy2d_train", "stepz"), 10, "toy2d_train.stepz = 10"),
]


_set = with_value


@pytest.mark.parametrize(("keys", "value", "expected"), BAD_VALUES)
def test_bad_values_name_key_and_value(params, keys, value, expected):
    bad = _set(params, keys, value)
    with pytest.raises(ConfigError) as err:
        STAGES["fig1_mog"].validate(bad) if keys[0] == "toy2d_eval" else STAGES["toy2d_train"].validate(bad)
    assert expected in str(err.value)


def test_stage_stops_before_any_work(params, tmp_path, capsys, monkeypatch):
    bad = _set(params, ("toy2d_train", "steps"), -5)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    monkeypatch.setattr("replication.stage.REPO_ROOT", tmp_path)
    assert main(["toy2d_train", "--params", str(path)]) == 2
    assert "toy2d_train.steps = -5" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


CROSS_SECTION = [
    (("fig1_mog", "nfe_show"), 3, "fig1_mog.nfe_show = 3", "fig1_mog"),
    (("toy2d_train", "snapshot_every"), 0, "toy2d_train.snapshot_every = 0", "underdetermination"),
    (("toy2d_train", "ma", "window_weights"), [1.0, 2.0], "toy2d_train.ma.window_weights = [1.0, 2.0]",
     "toy2d_train"),
]


@pytest.mark.parametrize(("keys", "value", "expected", "stage"), CROSS_SECTION)
def test_cross_section_values_are_checked_before_work(params, keys, value, expected, stage):
    with pytest.raises(ConfigError) as err:
        STAGES[stage].validate(_set(params, keys, value))
    assert expected in str(err.value)


def test_unknown_student_in_eval_stage_is_named(params):
    bad = _set(params, ("fig1_mog", "students"), ["perflow", "nosuch"])
    with pytest.raises(ConfigError, match=r"fig1_mog.students\[1\] = 'nosuch'"):
        STAGES["fig1_mog"].validate(bad)


def test_unknown_profile_is_named(tmp_path):
    with pytest.raises(ConfigError, match="profile = 'huge'"):
        apply_profile("huge", tmp_path / "params.yaml", ROOT / "replication" / "profiles")


def test_command_line_exit_code_and_message(params, tmp_path):
    bad = _set(params, ("toy2d_train", "ma", "weight"), -1)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "replication.stage", "toy2d_train", "--params", str(path),
                           "--check-only"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "toy2d_train.ma.weight = -1" in proc.stderr


def expand_foreach(stages: dict) -> dict:
    """dvc.yaml's stages with every ``foreach`` list expanded as DVC does: ``NAME@ITEM``, ``${item}``
    replaced in every string of ``do``."""
    def fill(node, item):
        if isinstance(node, str):
            return node.replace("${item}", str(item))
        if isinstance(node, list):
            return [fill(n, item) for n in node]
        if isinstance(node, dict):
            return {fill(k, item): fill(v, item) for k, v in node.items()}
        return node

    expanded = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            expanded.update({f"{name}@{item}": fill(stage["do"], item) for item in stage["foreach"]})
        else:
            expanded[name] = stage
    return expanded


def test_dvc_stages_match_the_registry():
    dvc = expand_foreach(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(dvc) == set(STAGES)
    owner = {s.name: t for t in registry.tiers().values() for s in t.stages}
    for name, stage in dvc.items():
        spec = STAGES[name]
        assert stage["cmd"] == f"python -m replication.stage {name}"
        assert spec.notebook in stage["deps"], f"{name}: notebook is not a dependency"
        assert set(registry.HARNESS_FILES) <= set(stage["deps"]), f"{name}: harness files missing"
        assert "replication/profiles/${profile}.yaml" in stage["deps"], f"{name}: profile overlay"
        assert f"replication/{owner[name].name}" in stage["deps"], f"{name}: tier folder missing"
        # a stage may list parts of a section (``toy2d_sweep.families.<one>``): the sections it reads
        assert {p.split(".")[0] for p in stage["params"]} == {"profile", *spec.sections}, \
            f"{name}: params sections differ"
        assert (ROOT / spec.notebook).exists()
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
        metrics = [next(iter(m)) for m in stage.get("metrics", [])]
        assert f"{spec.out_dir}/{Path(spec.notebook).stem}.ipynb" in outs
        assert all(m.startswith(spec.out_dir + "/") for m in metrics)


def test_larger_profiles_are_valid(tmp_path):
    """``cpu-full`` validates here; ``gpu`` validates once its ``cuda`` devices exist, and without
    CUDA it is refused naming the device key (checked with the devices set to cpu and as written)."""
    import torch

    from replication.config import deep_merge

    base = load_params(ROOT / "params.yaml")
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    assert apply_profile("cpu-full", path, ROOT / "replication" / "profiles")["images"]["dataset"] == "mnist"
    gpu = deep_merge(base, load_params(ROOT / "replication" / "profiles" / "gpu.yaml"))
    on_cpu = {k: ({**v, "device": "cpu"} if isinstance(v, dict) and "device" in v else v) for k, v in gpu.items()}
    registry.validate_all(on_cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"\.device = 'cuda'"):
            registry.validate_all(gpu)
