"""The published COCO protocol in the evaluator: captions and reference preprocessing as Rectified
Diffusion's generate_5k.py prepares them, guidance swept and reported per row, and the published
PeRFlow delta weights scored by our own evaluator (tiny stand-ins, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replication.sd15.coco import coco_prompts, lanczos_center_crop, resize_crop_box


# ------------------------------------------------------------------------------------- captions
def test_the_first_caption_is_the_first_in_file_order(tmp_path):
    """``caption_list[:1]`` of the published code: the first annotation of an image in the file,
    whatever its id (the lowest id would pick another caption here), stripped; images by id."""
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}],
            "annotations": [{"id": 50, "image_id": 7, "caption": " a dog on a sofa. "},
                            {"id": 2, "image_id": 3, "caption": "three cats"},
                            {"id": 10, "image_id": 7, "caption": "lowest id, second in the file"},
                            {"id": 1, "image_id": 3, "caption": "lowest id of image 3"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    prompts = coco_prompts(path, 2)
    assert [(p.image_id, p.file_name, p.caption) for p in prompts] == [(3, "b.jpg", "three cats"),
                                                                       (7, "a.jpg", "a dog on a sofa.")]


# --------------------------------------------------------------------------- reference images
@pytest.mark.parametrize(("size_in", "size", "resized", "box"), [
    ((10, 6), 4, (6, 4), (1, 0, 5, 4)),          # 4 * 10 / 6 = 6.67 -> 6; (6 - 4) / 2 = 1
    ((7, 4), 2, (3, 2), (0, 0, 2, 2)),           # 3.5 -> 3; round(0.5) = 0 (half to even)
    ((5, 9), 4, (4, 7), (0, 2, 4, 6)),           # tall: 7.2 -> 7; round(1.5) = 2
    ((640, 480), 512, (682, 512), (85, 0, 597, 512)),
    ((512, 512), 512, (512, 512), (0, 0, 512, 512)),
])
def test_resize_and_crop_box_by_hand(size_in, size, resized, box):
    assert resize_crop_box(*size_in, size) == (resized, box)


def test_no_resize_needed_crops_the_centre_columns():
    """A 7 x 4 image at size 4: the short side is already 4, so the crop takes columns 2..5
    (``round((7 - 4) / 2) = 2``) untouched."""
    pixels = np.zeros((4, 7, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(7)[None, :] * 30
    pixels[:, :, 1] = np.arange(4)[:, None] * 50
    out = np.asarray(lanczos_center_crop(Image.fromarray(pixels), 4))
    assert out.shape == (4, 4, 3)
    assert out[0, :, 0].tolist() == [60, 90, 120, 150] and out[:, 0, 1].tolist() == [0, 50, 100, 150]


def test_the_reference_preprocessing_is_torchvisions_lanczos_resize_then_centre_crop():
    """The published code's own transform, ``Resize(size, LANCZOS)`` + ``CenterCrop(size)``, on a
    random 23 x 13 image, pixel for pixel; and not the old bicubic square crop."""
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (13, 23, 3), dtype=np.uint8))
    published = transforms.Compose([transforms.Resize(8, interpolation=transforms.InterpolationMode.LANCZOS),
                                    transforms.CenterCrop(8)])(img)
    ours = lanczos_center_crop(img, 8)
    assert np.array_equal(np.asarray(ours), np.asarray(published))
    w, h = img.size
    s = min(w, h)
    bicubic = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((8, 8), Image.BICUBIC)
    assert not np.array_equal(np.asarray(ours), np.asarray(bicubic))


# --------------------------------------------- guidance sweep and the published PeRFlow delta row
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel

    from replication.sd15.tiny import build_tiny_sd, write_coco_folder

    root = tmp_path_factory.mktemp("protocols")
    sd = build_tiny_sd(root / "sd")
    base = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(0.01 * torch.randn_like(p))
    delta = root / "perflow-sd15-delta-weights"
    base.save_pretrained(delta, variant="v0-1")  # the published layout: a UNet folder, variant v0-1
    return {"sd": sd, "delta": delta, "coco": write_coco_folder(root / "coco", n=3)}


def _eval_cfg(tiny, out: Path, delta: str | None):
    from replication.sd15.config import ModelSpec, PublishedPeRFlowSpec, SD15EvalConfig
    from replication.sd15.metrics import register_extractor
    from replication.sd15.tiny import register_tiny_clip, tiny_fid_extractor_class

    register_extractor("tiny-test-fid", tiny_fid_extractor_class())
    published = (PublishedPeRFlowSpec(delta_weights=delta, base=str(tiny["sd"]), variant="v0-1", steps=[4],
                                      guidance=[2.0]) if delta else PublishedPeRFlowSpec())
    return SD15EvalConfig(
        coco_dir=str(tiny["coco"]), output_dir=str(out), n_prompts=3, resolution=16, batch_size=3,
        fid_extractor="tiny-test-fid", clip_model=register_tiny_clip(), clip_pretrained="", mixed_precision="no",
        models={"teacher": ModelSpec(path=str(tiny["sd"]), scheduler="ddim", steps=[2], guidance=[1.0, 3.0])},
        published_perflow=published)


def test_guidance_is_swept_reported_and_the_published_delta_weights_are_scored(tiny, tmp_path):
    from replication.sd15.evaluate import evaluate

    out = tmp_path / "eval"
    metrics = evaluate(_eval_cfg(tiny, out, str(tiny["delta"])), device=torch.device("cpu"), progress=False)
    rows = {(r["model"], r["steps"], r["guidance"]): r for r in metrics["rows"]}
    assert set(rows) == {("teacher", 2, 1.0), ("teacher", 2, 3.0), ("perflow_published", 4, 2.0)}
    assert all(r["fid"] > 0 and -1 <= r["clip"] <= 1 for r in rows.values())
    assert rows[("perflow_published", 4, 2.0)]["published"] and metrics["published_perflow"] == str(tiny["delta"])
    # the guidance reached the sampler: the same seeds give other images at another scale
    one, three = (_first_image(out / "images" / "teacher" / f"steps_2_guidance_{g}") for g in ("1", "3"))
    assert not np.array_equal(one, three)
    table = (out / "comparison.md").read_text()
    assert "| marflow (this run) | teacher | 2 | 1 |" in table and "| marflow (this run) | teacher | 2 | 3 |" in table
    assert "| marflow evaluator, published PeRFlow delta weights | perflow_published | 4 | 2 |" in table
    assert "not provided" not in table
    assert json.loads((out / "metrics.json").read_text())["protocol"]["caption"].startswith("first caption")


def _first_image(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(sorted(folder.iterdir())[0]))


def test_the_published_delta_weights_are_added_to_the_base_unet(tiny):
    """W = W_SD + dW (PeRFlow's merge_delta_weights_into_unet), from the variant file of the folder."""
    from safetensors.torch import load_file

    from replication.sd15.evaluate import load_pipeline

    spec = _eval_cfg(tiny, Path("unused"), str(tiny["delta"])).evaluated_models()["perflow_published"]
    pipe = load_pipeline(spec, torch.device("cpu"), torch.float32)
    base = load_file(str(tiny["sd"] / "unet" / "diffusion_pytorch_model.safetensors"))
    delta = load_file(str(tiny["delta"] / "diffusion_pytorch_model.v0-1.safetensors"))
    merged = pipe.unet.state_dict()
    assert set(merged) == set(base) == set(delta)
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight", "conv_out.bias"):
        assert torch.allclose(merged[key], base[key] + delta[key], atol=1e-7)
    assert type(pipe.scheduler).__name__ == "PeRFlowScheduler" and pipe.scheduler.config.num_time_windows == 4


def test_without_published_weights_the_row_says_not_provided(tiny, tmp_path):
    from replication.sd15.evaluate import evaluate

    out = tmp_path / "eval"
    cfg = _eval_cfg(tiny, out, None)
    cfg.models["teacher"].guidance = [1.0]
    metrics = evaluate(cfg, device=torch.device("cpu"), progress=False)
    assert [r["model"] for r in metrics["rows"]] == ["teacher"] and metrics["published_perflow"] == "not provided"
    assert not (out / "images" / "perflow_published").exists()
    line = next(x for x in (out / "comparison.md").read_text().splitlines() if "perflow_published" in x)
    assert "| not provided | not provided |" in line


@pytest.mark.parametrize(("layout", "needle"), [
    ("no_config", "config.json (a diffusers UNet folder)"),
    ("other_variant", "the weights of variant 'v0-1'"),
    ("bin_file", "delta weights in safetensors format"),
])
def test_a_malformed_delta_weights_path_is_refused_before_any_model_loads(tiny, tmp_path, layout, needle):
    import shutil

    from replication.config import ConfigError
    from replication.sd15.evaluate import check_inputs

    bad = tmp_path / "delta"
    if layout == "bin_file":
        bad = tmp_path / "delta.bin"
        bad.write_bytes(b"x")
    else:
        shutil.copytree(tiny["delta"], bad)
        if layout == "no_config":
            (bad / "config.json").unlink()
        else:
            (bad / "diffusion_pytorch_model.v0-1.safetensors").rename(bad / "diffusion_pytorch_model.v0-0.safetensors")
    with pytest.raises(ConfigError) as err:
        check_inputs(_eval_cfg(tiny, tmp_path / "out", str(bad)))
    assert "published_perflow.delta_weights" in str(err.value) and needle in str(err.value)
