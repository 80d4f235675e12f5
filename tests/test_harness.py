"""The tier-generic harness: registry, CLI errors, inactive params, notebook scrubbing, retrain."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from params_helpers import with_value

from replication import registry
from replication.config import ConfigError, load_params
from replication.reproducible import WALL_TIME_STRIPPED, scrub_notebook, wall_time_line

ROOT = Path(__file__).resolve().parents[1]
HARNESS_MODULES = ["config", "notebook", "profile", "registry", "reproducible", "retrain", "stage"]


def _cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def params() -> dict:
    return load_params(ROOT / "params.yaml")


_set = with_value


# -- the harness imports no tier -------------------------------------------------------------------
@pytest.mark.parametrize("module", HARNESS_MODULES)
def test_harness_modules_name_no_tier(module):
    source = (ROOT / "replication" / f"{module}.py").read_text()
    imports = [line for line in source.splitlines() if re.match(r"\s*(from|import)\s", line)]
    for tier in registry.tiers():
        assert not any(tier in line for line in imports), f"replication/{module}.py imports {tier}"


def test_a_new_tier_plugs_in_by_adding_files(tmp_path):
    """A copy of the harness plus one new package ``replication/fake/`` (no other edit): its stage
    is listed, its section validated, and a bad value in it named, by the unchanged runner."""
    shutil.copytree(ROOT / "replication", tmp_path / "replication",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "marflow_core", tmp_path / "marflow_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    fake = tmp_path / "replication" / "fake"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "stages.py").write_text(
        "from dataclasses import dataclass\n"
        "from ..config import require\n"
        "from ..registry import StageSpec, Tier\n\n"
        "@dataclass\nclass FakeConfig:\n    size: int = 1\n\n"
        "    def validate(self, where):\n"
        "        require(self.size > 0, f'{where}.size', self.size, 'must be > 0')\n\n"
        "TIER = Tier('fake', {'fake_section': FakeConfig},\n"
        "            (StageSpec('fake_stage', 'notebooks/fake.py', ('fake_section',), 'results/fake'),))\n")
    env = {"PYTHONPATH": str(tmp_path)}
    listed = _cli("-m", "replication.stage", "--list", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "fake_stage [fake, params.yaml]: notebooks/fake.py -> results/fake" in listed.stdout
    assert "fig1_mog" in listed.stdout  # the existing tiers are still there
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fake_section": {"size": 3}}))
    ok = _cli("-m", "replication.stage", "fake_stage", "--check-only", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fake_section": {"size": -1}}))
    bad = _cli("-m", "replication.stage", "fake_stage", "--check-only", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "fake_section.size = -1: must be > 0" in bad.stderr


def test_sections_and_stages_have_one_owner():
    for kind in ("sections", "stages"):
        owners: dict[str, str] = {}
        for tier in registry.tiers().values():
            names = tier.sections if kind == "sections" else [s.name for s in tier.stages]
            for name in names:
                assert name not in owners, f"{kind} {name} in tiers {owners[name]} and {tier.name}"
                owners[name] = tier.name


# -- command-line errors are one line, not a traceback --------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["nosuch"], "stage = 'nosuch': unknown stage; known stages: ["),
    (["fig1_mog", "--params", "missing.yaml"], "missing.yaml: no such params file"),
    (["fig1_mog", "--params", "missing.yaml", "--check-only"], "missing.yaml: no such params file"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    proc = _cli("-m", "replication.stage", *args, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_unparsable_params_file_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("toy2d: [unclosed\n")
    proc = _cli("-m", "replication.stage", "fig1_mog", "--check-only", cwd=tmp_path,
                env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_profile_and_tier_are_one_line(tmp_path):
    proc = _cli("-m", "replication.profile", "huge", "--params", str(ROOT / "params.yaml"))
    assert proc.returncode == 2 and "profile = 'huge'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("-m", "replication.retrain", "--tier", "nosuch", "--dry-run")
    assert proc.returncode == 2 and "tier 'nosuch': unknown tier" in proc.stderr


# -- no silently ignored input -----------------------------------------------------------------------
INACTIVE = [
    (("toy2d_train", "ma", "divergence"), "exact", "toy2d_train.ma.divergence = 'exact': has no effect"),
    (("toy2d_train", "ma", "n_probes"), 4, "toy2d_train.ma.n_probes = 4: has no effect"),
    (("toy2d_train", "students", "perflow", "ma_weight"), 0.5,
     "toy2d_train.students.perflow.ma_weight = 0.5: has no effect"),
]


@pytest.mark.parametrize(("keys", "value", "expected"), INACTIVE)
def test_keys_without_effect_are_rejected(params, keys, value, expected):
    with pytest.raises(ConfigError) as err:
        registry.stage("toy2d_train").validate(_set(params, keys, value))
    assert expected in str(err.value)


def test_probe_keys_need_hutchinson(params):
    continuous = _set(params, ("toy2d_train", "ma"), {**params["toy2d_train"]["ma"], "logdet": "continuous",
                                                      "divergence": "exact", "probe_kind": "gaussian"})
    with pytest.raises(ConfigError, match=r"toy2d_train.ma.probe_kind = 'gaussian': has no effect"):
        registry.stage("toy2d_train").validate(continuous)
    hutchinson = _set(continuous, ("toy2d_train", "ma", "divergence"), "hutchinson")
    with pytest.raises(ConfigError, match=r"toy2d_train.ma.n_probes: required key is missing"):
        registry.stage("toy2d_train").validate(hutchinson)  # now the probe keys matter
    hutchinson = _set(hutchinson, ("toy2d_train", "ma", "n_probes"), 1)
    registry.stage("toy2d_train").validate(hutchinson)  # now the probe kind matters


def test_sections_of_absent_methods_are_rejected(params):
    only_perflow = _set(params, ("toy2d_train", "students"), {"perflow": {"method": "perflow", "windows": 4, "ma": False,
                                                                          "seeds": [0]}})
    with pytest.raises(ConfigError) as err:
        registry.stage("toy2d_train").validate(only_perflow)
    assert "toy2d_train.ma = " in str(err.value) and "no student has ma: true" in str(err.value)
    assert "'reflow_pairs'" in str(err.value)  # every inactive key is named
    trimmed = copy.deepcopy(only_perflow)
    del trimmed["toy2d_train"]["ma"], trimmed["toy2d_train"]["reflow_pairs"]
    registry.stage("toy2d_train").validate(trimmed)


@pytest.mark.parametrize(("keys", "value", "stage", "expected"), [
    (("toy2d_eval", "mmd_samples"), 10**9, "fig1_mog", "toy2d_eval.mmd_samples = 1000000000: the MMD uses"),
    (("fig1_mog", "n_trajectories"), 10**9, "fig1_mog", "fig1_mog.n_trajectories = 1000000000: trajec"),
])
def test_values_that_would_be_silently_capped_are_rejected(params, keys, value, stage, expected):
    with pytest.raises(ConfigError) as err:
        registry.stage(stage).validate(_set(params, keys, value))
    assert expected in str(err.value)


def test_unknown_top_level_section_is_rejected(params):
    with pytest.raises(ConfigError, match=r"toy2d_evl = "):
        registry.validate_all({**params, "toy2d_evl": {"seed": 1}})


# -- executed notebooks are a function of code, params and seed ----------------------------------------
def _executed_notebook(tmp: str, wall: float, rate: str, cell_id: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"duration": wall, "start_time": "2026-01-01T00:00:00",
                                "input_path": f"/abs/repo/{tmp}/x.source.ipynb",
                                "parameters": {"out_dir": tmp}}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    code = nbformat.v4.new_code_cell(f'out_dir = "{tmp}"')
    code["id"] = cell_id
    code["metadata"] = {"execution": {"iopub.execute_input": "2026-01-01T00:00:01Z"},
                        "papermill": {"duration": wall}, "tags": ["injected-parameters"]}
    code["outputs"] = [
        nbformat.v4.new_output("stream", name="stderr",
                               text=f"\rtrain:  50%|#####     | 5/10 [00:0{wall:.0f}<00:01, {rate}it/s, tm=0.5]"),
        nbformat.v4.new_output("stream", name="stderr",
                               text=f"\rtrain: 100%|##########| 10/10 [00:0{wall:.0f}<00:00, {rate}it/s, tm=0.4]\n"),
        nbformat.v4.new_output("stream", name="stdout", text=wall_time_line("train", wall) + " (10 steps)\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"KL 0.123 ± 0.004, saved to /abs/repo/{tmp}/m.json\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": f"'{tmp}'"}, execution_count=1),
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), code]
    return nb


def test_scrub_makes_two_runs_identical_and_keeps_results():
    runs = []
    for tmp, wall, rate, cell_id in (("results/.x.tmp-ab12", 3.2, "12.5", "f00d"),
                                     ("results/.x.tmp-zz99", 7.9, "8.1", "beef")):
        nb = _executed_notebook(tmp, wall, rate, cell_id)
        replacements = {"/abs/repo/": "", tmp: "results/x"}
        runs.append(nbformat.writes(nbformat.from_dict(scrub_notebook(nb, replacements))))
    assert runs[0] == runs[1]
    scrubbed = json.loads(runs[0])
    nbformat.validate(nbformat.reads(runs[0], as_version=4))
    assert set(scrubbed["metadata"]) == {"kernelspec", "papermill"}
    assert scrubbed["metadata"]["papermill"] == {"parameters": {"out_dir": "results/x"}}
    code = scrubbed["cells"][1]
    assert [c["id"] for c in scrubbed["cells"]] == ["cell-000", "cell-001"]
    assert code["metadata"] == {"tags": ["injected-parameters"]}
    assert "".join(code["source"]) == 'out_dir = "results/x"'
    text = "".join("".join(o.get("text", "")) for o in code["outputs"])
    assert "it/s" not in text and "%|" not in text  # progress frames gone
    assert f"[wall time] train: {WALL_TIME_STRIPPED}" in text and "3.2 s" not in text
    assert "KL 0.123 ± 0.004, saved to results/x/m.json" in text  # results and stable paths kept
    assert "".join(code["outputs"][-1]["data"]["text/plain"]) == "'results/x'"
    # scrubbing is idempotent
    again = nbformat.writes(nbformat.from_dict(scrub_notebook(nbformat.reads(runs[0], as_version=4), {})))
    assert again == runs[0]


def test_retrain_dry_run_lists_every_persistent_output():
    proc = _cli("-m", "replication.retrain", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    root = [t for t in registry.tiers().values() if t.params_file == "params.yaml"]
    expected = [out for tier in root for out in tier.persistent_outputs]
    assert expected and all(f"would delete {out}" in proc.stdout for out in expected)
    gpu = [out for t in registry.tiers().values() if t.params_file != "params.yaml"
           for out in t.persistent_outputs]
    assert not any(out in proc.stdout for out in gpu)  # the GPU tiers' project is its own


def test_retrain_deletes_outputs_but_keeps_dvc_gitignores(tmp_path):
    from replication.retrain import delete_keeping_gitignores

    out = tmp_path / "checkpoints" / "sweep"
    (out / "family" / "run0").mkdir(parents=True)
    (out / "family" / "run0" / "last.pt").write_bytes(b"x")
    (out / "family" / "metrics.json").write_text("{}")
    (out / ".gitignore").write_text("/family\n")
    (tmp_path / "checkpoints" / "plain" / "deep").mkdir(parents=True)
    (tmp_path / "checkpoints" / "plain" / "deep" / "a.pt").write_bytes(b"x")
    lone = tmp_path / "checkpoints" / "lone.pt"
    lone.write_bytes(b"x")
    for path in (out, tmp_path / "checkpoints" / "plain", lone, tmp_path / "absent"):
        delete_keeping_gitignores(path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["checkpoints", "checkpoints/sweep", "checkpoints/sweep/.gitignore"]
    assert (out / ".gitignore").read_text() == "/family\n"


def test_cuda_device_is_checked_at_validation(params, monkeypatch):
    import torch

    cuda = _set(params, ("toy2d", "device"), "cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"toy2d.device = 'cuda:1': CUDA is not available"):
        registry.validate_all(cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"toy2d.device = 'cuda:1': this machine has 1 CUDA device"):
        registry.validate_all(cuda)
    registry.validate_all(_set(params, ("toy2d", "device"), "cuda:0"))
    with pytest.raises(ConfigError, match=r"toy2d.device = 'gpu'"):
        registry.validate_all(_set(params, ("toy2d", "device"), "gpu"))
