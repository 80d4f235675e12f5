"""Disk-aware defaults of the GPU tier: the SD 1.5 download list is exactly what the loaders read,
DVC keeps no second copy of any output, a finished run drops its checkpoints and is not trained
again, and the defaults are those the documented disk budget assumes."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from replication.config import ConfigError
from replication.sd15.inputs import SD15_FILES, check_pipeline_dir, download_command, sd15_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from replication.sd15.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("disk") / "sd")


def _like_the_hub_repository(tiny_sd: Path, root: Path) -> Path:
    """The tiny pipeline in the file layout of stable-diffusion-v1-5/stable-diffusion-v1-5: its
    tokenizer files, a feature extractor named in model_index.json, and the files the loaders should
    never open (fp16 / .bin / non_ema variants, single-file checkpoints, the safety checker)."""
    from transformers import CLIPImageProcessor

    shutil.copytree(tiny_sd, root)
    (root / "tokenizer" / "tokenizer.json").unlink()
    (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    CLIPImageProcessor().save_pretrained(root / "feature_extractor")
    index = json.loads((root / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (root / "model_index.json").write_text(json.dumps(index))
    for sub, stem, bin_stem in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("text_encoder", "model", "pytorch_model")):
        shutil.copy(root / sub / f"{stem}.safetensors", root / sub / f"{stem}.fp16.safetensors")
        for name in (f"{bin_stem}.bin", f"{bin_stem}.fp16.bin"):
            (root / sub / name).write_bytes(b"never read")
    shutil.copy(root / "unet" / "diffusion_pytorch_model.safetensors",
                root / "unet" / "diffusion_pytorch_model.non_ema.safetensors")
    (root / "safety_checker").mkdir()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "model.fp16.safetensors"):
        (root / "safety_checker" / name).write_bytes(b"never read")
    for name in ("v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-inference.yaml", "README.md"):
        (root / name).write_bytes(b"never read")
    return root


def _opened_while_loading(root: Path, monkeypatch) -> set[str]:
    """The files under ``root`` that ``load_components`` and ``load_sd_pipeline`` open: Python-level
    opens (an audit hook) and the safetensors files diffusers and transformers read natively."""
    import safetensors.torch
    import transformers.modeling_utils as hf_modeling

    from replication.sd15.components import load_components, load_sd_pipeline

    opened: set[str] = set()
    base = root.resolve()
    active = [True]

    def note(path) -> None:
        if active[0] and isinstance(path, str | Path):
            try:
                opened.add(Path(path).resolve().relative_to(base).as_posix())
            except ValueError:
                pass

    sys.addaudithook(lambda event, args: note(args[0]) if event == "open" and args else None)
    load_file, safe_open = safetensors.torch.load_file, hf_modeling.safe_open
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, *a, **k: (note(path), load_file(path, *a, **k))[1])
    monkeypatch.setattr(hf_modeling, "safe_open", lambda path, *a, **k: (note(path), safe_open(path, *a, **k))[1])
    try:
        load_components(root, torch.device("cpu"), torch.float32)
        load_sd_pipeline(root)
    finally:
        active[0] = False  # the audit hook cannot be removed; it goes quiet
    return opened


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_the_download_list_is_exactly_what_the_loaders_read(tiny_sd, tmp_path, monkeypatch, variant):
    """Every file the loaders open is on the list; every file on the list is opened or, read by the
    tokenizer's native code, needed (without it the loaders fail); the list alone loads."""
    from replication.sd15.components import load_components, load_sd_pipeline

    repo = _like_the_hub_repository(tiny_sd, tmp_path / "hub")
    files = set(sd15_files(variant))
    only = tmp_path / "listed"
    for name in files:
        (only / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, only / name)
    if variant is None:
        opened = _opened_while_loading(repo, monkeypatch)
        assert opened <= files, sorted(opened - files)
    else:
        opened = _opened_while_loading(only, monkeypatch)
        assert opened <= files, sorted(opened - files)
    for name in sorted(files - opened):  # not seen by the hooks: each must be needed
        missing = tmp_path / f"without_{name.replace('/', '_')}"
        shutil.copytree(only, missing)
        (missing / name).unlink()
        with pytest.raises(Exception):  # noqa: B017 - any failure to load will do
            load_components(missing, torch.device("cpu"), torch.float32)
            load_sd_pipeline(missing)
    assert sorted(files - opened) == ["tokenizer/merges.txt", "tokenizer/vocab.json"]
    load_components(only, torch.device("cpu"), torch.float32)
    load_sd_pipeline(only)


def test_the_listed_files_are_one_weights_file_per_model():
    weights = [f for f in SD15_FILES if f.endswith(".safetensors")]
    assert sorted(weights) == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                               "vae/diffusion_pytorch_model.safetensors"]
    assert all(".fp16." in f for f in sd15_files("fp16") if f.endswith(".safetensors"))
    command = download_command("DIR")
    assert command.startswith("hf download stable-diffusion-v1-5/stable-diffusion-v1-5 ")
    assert command.endswith(" --local-dir DIR") and all(f" {f} " in command for f in SD15_FILES)


def test_the_gpu_doc_shows_the_download_commands():
    text = (ROOT / "docs" / "gpu.md").read_text()
    assert download_command() in text and download_command(variant="fp16") in text
    assert "--exclude '*.ckpt'" not in text


def test_a_pipeline_naming_a_feature_extractor_needs_its_config(tiny_sd, tmp_path):
    """The pipeline loads the feature extractor model_index.json names (training saves the student
    through it at the very end): its config is checked with the other inputs."""
    repo = _like_the_hub_repository(tiny_sd, tmp_path / "hub")
    check_pipeline_dir(repo)
    (repo / "feature_extractor" / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match=r"feature_extractor/preprocessor_config.json"):
        check_pipeline_dir(repo, "model_dir")


def test_no_gpu_dvc_output_is_copied_into_the_cache():
    """``cache: false`` on every output (DVC would otherwise copy checkpoints, pipelines and images
    into .dvc/cache) and ``persist: true`` (resumable runs, reused images)."""
    stages = yaml.safe_load((ROOT / "replication" / "gpu" / "dvc.yaml").read_text())["stages"]
    outs = [out for stage in stages.values() for kind in ("outs", "metrics") for out in stage.get(kind, [])]
    assert len(outs) >= 9
    for out in outs:
        ((path, flags),) = out.items()
        assert flags == {"cache": False, "persist": True}, path


def _budget_rows(text: str) -> list[list[str]]:
    section = text.split("## Disk budget", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| item") and not line.startswith("| ---")]


def test_the_gpu_defaults_are_those_the_disk_budget_assumes():
    params = yaml.safe_load((ROOT / "replication" / "gpu" / "params.yaml").read_text())
    for name in ("sd15_train", "sd15_train_perflow"):
        assert params[name]["checkpoints_total_limit"] == 1 and params[name]["delete_checkpoints_when_done"] is True
    assert params["sd15_eval"]["keep_images"] is False
    rows = _budget_rows((ROOT / "docs" / "gpu.md").read_text())
    total = next(r for r in rows if "total" in r[0])
    peak = sum(float(r[1]) for r in rows if r[2] == "yes")
    assert float(total[1].strip("*")) == pytest.approx(peak)
    checkpoint = 13.8
    written = next(r for r in rows if "being written" in r[0])
    assert float(written[1]) == pytest.approx(checkpoint * (params["sd15_train"]["checkpoints_total_limit"] + 1))
    assert peak + 8.0 < 64 * 2**30 / 1e9  # with the Python environment, on a 64 GiB disk
    assert all(float(r[1]) < peak for r in rows if r[2] == "no")


def test_a_finished_run_drops_its_checkpoints_and_is_not_trained_again(tiny_sd, tmp_path, monkeypatch):
    from test_sd15_gpu_fixes import _train_cfg

    from replication.common.students import StudentSpec
    from replication.sd15 import components
    from replication.sd15.config import PeRFlowSD15Config
    from replication.sd15.tiny import write_caption_folder
    from replication.sd15.train import check_inputs, train

    inputs = {"sd": tiny_sd, "data": write_caption_folder(tmp_path / "data", n=4)}
    out = tmp_path / "run"
    cfg = _train_cfg(inputs, out, steps=2, delete_checkpoints_when_done=True, perflow=PeRFlowSD15Config(teacher_steps=1),
                     student=StudentSpec(method="perflow", windows=4, ma=False, seeds=[0]))
    assert train(cfg, progress=False) == out / "pipeline"
    assert not (out / "checkpoints").exists() and (out / "pipeline" / "model_index.json").is_file()
    assert json.loads((out / "finished.json").read_text()) == {"steps": 2}
    rows = (out / "train_log.jsonl").read_text().splitlines()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(components, "load_components", no_training)
    check_inputs(cfg)
    assert train(cfg, progress=False) == out / "pipeline"  # nothing to do: no checkpoint, yet finished
    assert (out / "train_log.jsonl").read_text().splitlines() == rows
    longer = _train_cfg(inputs, out, steps=3, delete_checkpoints_when_done=True,
                        perflow=PeRFlowSD15Config(teacher_steps=1),
                        student=StudentSpec(method="perflow", windows=4, ma=False, seeds=[0]))
    with pytest.raises(ConfigError, match=re.escape("steps = 3: output_dir") + ".*finished at step 2.*"
                                          "delete_checkpoints_when_done"):
        check_inputs(longer)


def test_a_finished_run_that_keeps_its_checkpoints_resumes_to_more_steps(tiny_sd, tmp_path):
    from test_sd15_gpu_fixes import _train_cfg

    from replication.common.students import StudentSpec
    from replication.sd15.config import PeRFlowSD15Config
    from replication.sd15.tiny import write_caption_folder
    from replication.sd15.train import check_inputs, train

    inputs = {"sd": tiny_sd, "data": write_caption_folder(tmp_path / "data", n=4)}
    out = tmp_path / "run"
    kw = {"perflow": PeRFlowSD15Config(teacher_steps=1), "student": StudentSpec(method="perflow", windows=4, ma=False,
                                                                                 seeds=[0])}
    train(_train_cfg(inputs, out, steps=1, **kw), progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
    longer = _train_cfg(inputs, out, steps=2, **kw)
    check_inputs(longer)
    train(longer, progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # limit 1: the older one went
    assert json.loads((out / "finished.json").read_text()) == {"steps": 2}
