"""Three failure modes left open by the first GPU fixes, reproduced on CPU: a null CLIP checkpoint
whose open_clip download is not cached (found only when scoring began), the gradient-checkpointed
recompute of the float32 finite-difference passes running with TF32 back on, and an EMA update on
a step the fp16 GradScaler skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replication.common.students import StudentSpec
from replication.config import ConfigError
from replication.sd15.config import PeRFlowSD15Config, SD15EvalConfig, SD15TrainConfig

CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------- 1. CLIP weights from open_clip's cache
def _eval_cfg(tmp_path: Path, **over) -> SD15EvalConfig:
    from replication.sd15.config import ModelSpec

    fid = tmp_path / "inception.pth"
    fid.write_bytes(b"x")
    kw = {"coco_dir": "c", "output_dir": str(tmp_path / "o"), "clip_checkpoint": None,
          "fid_extractor_weights": str(fid), "models": {"m": ModelSpec(path="p")}}
    return SD15EvalConfig(**{**kw, **over})


def _cache_file(hub_cache: Path, repo: str, filename: str) -> Path:
    """A file in the Hugging Face cache layout (``models--org--name/snapshots/<rev>/``, ``refs/main``)."""
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_a_null_clip_checkpoint_needs_open_clips_download_in_the_cache(tmp_path, monkeypatch):
    """``clip_checkpoint: null`` loads ``clip_pretrained`` through open_clip, which downloads it
    from the hub when it is not cached: the weight check refuses it with the other weights, naming
    the key and the hub file, and passes once the file is in the cache."""
    from replication.sd15.evaluate import check_metric_weights

    hub_cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_cache))
    cfg = _eval_cfg(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_metric_weights(cfg)
    message = str(err.value)
    assert "clip_checkpoint = null" in message and "clip_pretrained = 'laion2b_s12b_b42k'" in message
    assert "open_clip_pytorch_model.bin" in message and CLIP_REPO in message
    _cache_file(hub_cache, CLIP_REPO, "open_clip_pytorch_model.bin")
    check_metric_weights(cfg)  # cached: nothing to download


def test_a_clip_pretrained_file_or_a_named_checkpoint_needs_no_cache(tmp_path, monkeypatch):
    from replication.sd15.evaluate import check_metric_weights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"x")
    check_metric_weights(_eval_cfg(tmp_path, clip_pretrained=str(weights)))
    check_metric_weights(_eval_cfg(tmp_path, clip_checkpoint=str(weights)))
    with pytest.raises(ConfigError, match="open_clip knows no pretrained weights 'no_such_tag'"):
        check_metric_weights(_eval_cfg(tmp_path, clip_pretrained="no_such_tag"))


# ------------------------------------------------ 2. TF32 in the checkpointed recompute of fd passes
def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32)


def test_the_checkpointed_recompute_of_the_float32_passes_keeps_tf32_off():
    """With gradient checkpointing, the blocks of a pass are recomputed in the backward pass, after
    ``float32_passes`` (TF32 off) is left: the trainer's checkpointing recomputes each block under
    the TF32 flags of its forward, and autocast stays off as torch keeps it."""
    from accelerate import Accelerator

    from replication.sd15.train import enable_checkpointing, float32_passes, tf32_flags, tf32_set

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    unet = _tiny_unet()
    enable_checkpointing(unet)
    unet = accelerator.prepare(unet.train())
    seen: list[tuple[str, tuple[bool, bool], bool]] = []
    phase = ["forward"]
    resnet = accelerator.unwrap_model(unet).down_blocks[0].resnets[0].conv1  # early in the block: recompute stops early
    resnet.register_forward_hook(lambda m, i, o: seen.append((phase[0], tf32_flags(), o.dtype == torch.float32)))
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 3, 16)
    with tf32_set((True, True)):
        with float32_passes(accelerator, unet):
            out = unet(x, t, text).sample
        assert tf32_flags() == (True, True)  # restored before the backward
        phase[0] = "backward"
        out.float().square().mean().backward()
    forward = [s for s in seen if s[0] == "forward"]
    recompute = [s for s in seen if s[0] == "backward"]
    assert forward and all(flags == (False, False) and fp32 for _, flags, fp32 in forward)
    assert recompute and all(flags == (False, False) and fp32 for _, flags, fp32 in recompute)
    assert next(accelerator.unwrap_model(unet).parameters()).grad is not None


def test_a_pass_outside_the_float32_context_is_recomputed_with_its_own_flags():
    from replication.sd15.train import enable_checkpointing, tf32_flags, tf32_set

    unet = _tiny_unet()
    enable_checkpointing(unet)
    unet.train()
    seen: list[tuple[bool, bool]] = []
    unet.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda m, i, o: seen.append(tf32_flags()))
    with tf32_set((True, False)):
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 16)).sample
    with tf32_set((False, True)):
        out.square().mean().backward()
    assert seen == [(True, False), (True, False)]  # the forward, then its recompute


# ---------------------------------------------------------- 3. no EMA update on a skipped step
def test_a_step_skipped_for_an_fp16_overflow_does_not_update_the_ema(tmp_path, monkeypatch):
    """The GradScaler skipped step 0 (the student's weights are unchanged): the EMA is not moved
    towards them either; steps 1 and 2 update it, once each."""
    from diffusers.training_utils import EMAModel
    from test_sd15_gpu_fixes import _overflowing_accelerator, _train_cfg

    from replication.sd15.tiny import build_tiny_sd, write_caption_folder
    from replication.sd15.train import train

    inputs = {"sd": build_tiny_sd(tmp_path / "sd"), "data": write_caption_folder(tmp_path / "data", n=4)}
    _overflowing_accelerator(monkeypatch, {0}, [])
    updates: list[int] = []
    original = EMAModel.step

    def counting_step(self, parameters):
        updates.append(self.optimization_step)
        return original(self, parameters)

    monkeypatch.setattr(EMAModel, "step", counting_step)
    out = tmp_path / "run"
    train(_train_cfg(inputs, out, mixed_precision="fp16", max_overflow_skips=3, steps=3, checkpoint_every=10,
                     student=StudentSpec(method="perflow", windows=4, ma=False, seeds=[0]),
                     perflow=PeRFlowSD15Config(teacher_steps=1)), progress=False)
    log = [line for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and '"overflow_skips": 1' in log[0]
    assert updates == [0, 1]  # two updates, for the two steps taken


def test_the_train_config_default_keeps_one_checkpoint():
    cfg = SD15TrainConfig(model_dir="m", data_dir="d", output_dir="o",
                          student=StudentSpec(method="perflow", windows=4, ma=False, seeds=[0]))
    assert cfg.checkpoints_total_limit == 1 and not cfg.delete_checkpoints_when_done


def test_the_trainer_checkpoints_with_the_precision_keeping_function(tmp_path, monkeypatch):
    """``gradient_checkpointing: true`` runs the student's blocks through ``checkpoint_keeping_precision``."""
    from test_sd15_gpu_fixes import _train_cfg

    from replication.gpu_common import accelerate_train as loop_module
    from replication.sd15 import train as train_module
    from replication.sd15.tiny import build_tiny_sd, write_caption_folder

    calls: list[str] = []
    original = loop_module.checkpoint_keeping_precision

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(loop_module, "checkpoint_keeping_precision", counting)
    inputs = {"sd": build_tiny_sd(tmp_path / "sd"), "data": write_caption_folder(tmp_path / "data", n=4)}
    train_module.train(_train_cfg(inputs, tmp_path / "run", steps=1, gradient_checkpointing=True,
                                  perflow=PeRFlowSD15Config(teacher_steps=1)), progress=False)
    assert "ResnetBlock2D" in calls
