"""Checks of the on-disk inputs (weights folder, caption folder, COCO folder), run before any import of
diffusers or any write: a missing or misplaced input fails in seconds with a message that names what
is missing and where it should go (docs/gpu.md lists the layouts).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError

#: (sub-path alternatives, what it is) every SD pipeline folder must hold
_PIPELINE_FILES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("model_index.json",), "the pipeline index"),
    (("unet/config.json",), "the UNet config"),
    (("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
      "unet/diffusion_pytorch_model.fp16.safetensors"), "the UNet weights"),
    (("vae/config.json",), "the VAE config"),
    (("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
      "vae/diffusion_pytorch_model.fp16.safetensors"), "the VAE weights"),
    (("text_encoder/config.json",), "the CLIP text-encoder config"),
    (("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
      "text_encoder/model.fp16.safetensors"), "the CLIP text-encoder weights"),
    (("tokenizer/vocab.json", "tokenizer/tokenizer.json"), "the CLIP tokenizer vocabulary"),
    (("scheduler/scheduler_config.json",), "the noise-schedule config"),
)
#: the hub repository of the SD 1.5 weights (docs/gpu.md)
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: the files of ``SD15_REPO`` that the loaders read (``components.load_components`` and
#: ``load_sd_pipeline``, tests/test_sd15_disk.py records them): the configs, the tokenizer, the
#: feature extractor's config that the pipeline's ``model_index.json`` names, and one weights file
#: per model. Everything else there (the .ckpt / single-file checkpoints, the .bin, fp16 and non_ema
#: variants, the safety checker) is never opened.
SD15_FILES: tuple[str, ...] = (
    "model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
)


def sd15_files(variant: str | None = None) -> tuple[str, ...]:
    """``SD15_FILES`` with the weights of ``variant`` (``fp16``: half the size; the loaders then
    load every model with ``variant="fp16"``, ``pipeline_variant``)."""
    if variant is None:
        return SD15_FILES
    return tuple(f.replace(".safetensors", f".{variant}.safetensors") for f in SD15_FILES)


def download_command(local_dir: str = "replication/gpu/inputs/sd15", variant: str | None = None) -> str:
    """The ``hf download`` command (``huggingface-cli download`` before huggingface_hub 1.0, same
    arguments) that fetches exactly ``sd15_files(variant)`` of ``SD15_REPO`` into ``local_dir``."""
    return f"hf download {SD15_REPO} {' '.join(sd15_files(variant))} --local-dir {local_dir}"


SD15_HINT = (f"a local diffusers Stable Diffusion 1.5 folder, e.g. `{download_command('DIR')}` on a "
             f"machine with network (docs/gpu.md)")


class MissingInput(ConfigError):
    """An input file or folder that is absent or laid out wrongly; the message says where it goes."""


def checked_inputs(section: str, check, cfg):
    """``check(cfg)``, with a ``ConfigError`` it raises prefixed by the params ``section`` it is about."""
    try:
        return check(cfg)
    except ConfigError as err:
        raise type(err)(f"{section}: {err}") from None


def _missing(key: str, path: Path | None, what: str, hint: str) -> MissingInput:
    value = repr(str(path)) if path is not None else "null"
    return MissingInput(f"{key} = {value}: missing {what}; {hint}")


def _file_and_folder(path: Path, key: str, file: str, folder: str, hint: str) -> tuple[Path, Path]:
    """``(path / file, path / folder)`` of a folder that holds both, or ``MissingInput`` naming the first
    one missing (the folder itself included)."""
    if not path.is_dir():
        raise _missing(key, path, "the folder itself", hint)
    if not (path / file).is_file():
        raise _missing(key, path, file, hint)
    if not (path / folder).is_dir():
        raise _missing(key, path, f"the folder {folder}/", hint)
    return path / file, path / folder


def check_pipeline_dir(path: str | Path, key: str = "model_dir", require_epsilon: bool = True) -> Path:
    """``path`` is a diffusers SD pipeline folder with every file the tier loads; returns it.

    ``require_epsilon``: the scheduler's ``prediction_type`` must be ``epsilon`` (a teacher; SD 2.x
    ``v_prediction`` and PeRFlow's own ``diff_eps`` schedulers are refused with the value named).
    """
    path = Path(path)
    if not path.is_dir():
        raise _missing(key, path, "the folder itself", f"put {SD15_HINT}")
    for alternatives, what in _PIPELINE_FILES:
        if not any((path / alt).is_file() for alt in alternatives):
            raise _missing(key, path, f"{what} ({' or '.join(alternatives)})",
                           f"expected the layout of {SD15_HINT}")
    index = json.loads((path / "model_index.json").read_text())
    if (index.get("feature_extractor") or [None])[0] is not None:  # the pipeline loads it
        extractor = path / "feature_extractor" / "preprocessor_config.json"
        if not extractor.is_file():
            raise _missing(key, path, "feature_extractor/preprocessor_config.json (model_index.json names a "
                           "feature extractor, which the pipeline loads)", f"expected the layout of {SD15_HINT}")
    if require_epsilon:
        sched_file = path / "scheduler" / "scheduler_config.json"
        pred = json.loads(sched_file.read_text()).get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ConfigError(f"{sched_file}: prediction_type = {pred!r}: unsupported; the teacher must be an "
                              f"eps-prediction model (SD 1.5: 'epsilon')")
    return path


def pipeline_variant(path: str | Path) -> str | None:
    """``"fp16"`` when some component of the pipeline folder ``path`` holds its weights only as the
    fp16 variant (``*.fp16.safetensors``, which diffusers loads only with ``variant="fp16"``; the
    components with plain files then load those), else None."""
    path = Path(path)
    for alternatives, _ in _PIPELINE_FILES:
        variant = [alt for alt in alternatives if ".fp16." in alt]
        plain = [alt for alt in alternatives if alt not in variant]
        if any((path / alt).is_file() for alt in variant) and not any((path / alt).is_file() for alt in plain):
            return "fp16"
    return None


def delta_weight_files(variant: str | None) -> tuple[str, ...]:
    """The weight files a delta-weights folder in diffusers' UNet layout may hold for ``variant``."""
    infix = f".{variant}" if variant else ""
    return (f"diffusion_pytorch_model{infix}.safetensors", f"diffusion_pytorch_model{infix}.bin")


def check_delta_weights(path: str | Path, variant: str | None, key: str) -> Path:
    """PeRFlow-style delta weights: a ``.safetensors`` file, or a folder in diffusers' UNet layout
    (``config.json`` and the weight file of ``variant``, as ``hansyan/perflow-sd15-delta-weights``
    ships them); returns the path, or ``MissingInput`` naming ``key``."""
    path = Path(path)
    hint = ("a .safetensors file of delta weights, or the folder `huggingface-cli download "
            "hansyan/perflow-sd15-delta-weights` writes (docs/gpu.md)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _missing(key, path, "delta weights in safetensors format (a .safetensors file)", hint)
        return path
    if not path.is_dir():
        raise _missing(key, path, "the file or folder itself", hint)
    if not (path / "config.json").is_file():
        raise _missing(key, path, "config.json (a diffusers UNet folder)", hint)
    files = delta_weight_files(variant)
    if not any((path / f).is_file() for f in files):
        raise _missing(key, path, f"the weights of variant {variant!r} ({' or '.join(files)})", hint)
    return path


def check_weights_file(path: str | Path | None, key: str, what: str, hint: str) -> None:
    """``path`` (a params value, None: not set) is an existing file, or ``MissingInput`` naming ``key``."""
    if path is None or not Path(path).is_file():
        raise _missing(key, Path(path) if path is not None else None, what, hint)


#: caption folder layout (docs/gpu.md): ``images/`` plus ``captions.jsonl`` with one
#: ``{"image": "<file name under images/>", "caption": "<text>"}`` per line
CAPTIONS_FILE = "captions.jsonl"
IMAGES_DIR = "images"
DATA_HINT = (f"a caption folder holds {IMAGES_DIR}/<name>.jpg|png and {CAPTIONS_FILE} with one "
             '{"image": "<name>.jpg", "caption": "..."} per line (docs/gpu.md)')


def read_caption_folder(path: str | Path, key: str = "data_dir", check_first: int = 1000) -> list[tuple[Path, str]]:
    """``[(image path, caption), ...]`` of a caption folder; the first ``check_first`` images are
    checked to exist (all are read lazily by the dataset, which names a missing file)."""
    path = Path(path)
    captions, images = _file_and_folder(path, key, CAPTIONS_FILE, IMAGES_DIR, DATA_HINT)
    pairs = []
    for lineno, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            pair = (images / entry["image"], str(entry["caption"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{captions}:{lineno} = {line[:80]!r}: expected "
                              '{"image": "<name>", "caption": "<text>"}') from None
        if len(pairs) < check_first and not pair[0].is_file():
            raise _missing(key, path, f"{IMAGES_DIR}/{entry['image']} (named on line {lineno} of {CAPTIONS_FILE})",
                           DATA_HINT)
        pairs.append(pair)
    if not pairs:
        raise ConfigError(f"{captions}: no caption lines; {DATA_HINT}")
    return pairs


COCO_ANNOTATIONS = "annotations/captions_val2017.json"
COCO_IMAGES = "val2017"
COCO_HINT = ("unzip the official COCO-2017 files annotations_trainval2017.zip and val2017.zip "
             "(cocodataset.org) into that folder (docs/gpu.md)")


def check_coco_dir(path: str | Path, key: str = "coco_dir") -> tuple[Path, Path]:
    """``(captions_val2017.json, val2017/)`` of a COCO-2017 folder, or ``MissingInput``."""
    return _file_and_folder(Path(path), key, COCO_ANNOTATIONS, COCO_IMAGES, COCO_HINT)
