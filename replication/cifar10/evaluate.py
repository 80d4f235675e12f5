"""The CIFAR-10 evaluation stage ``cifar10_fid``: Euler samples of the teacher and of every
``(student, seed)`` run at each NFE (``sample_few_step``), FID with torch-fidelity against the first
training images, written to ``out_dir/fid.json`` next to the published reference numbers, each
marked comparable with our rows or not (the protocol fields that differ named), and the same as a
table in ``out_dir/comparison.md`` (``references.comparison_table``).

Kept apart from ``tier.py`` (training) so that editing the evaluation changes no training run's code
fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from marflow_core import TimeWindows, sample_few_step, stream

from .config import CHANNELS, SIZE, Cifar10Config, FIDConfig, StudentsConfig
from .data import load_cifar10_uint8, to_uint8
from .references import comparison_table, our_protocol
from .tier import ckpt, load_student, load_teacher


class UInt8Images(torch.utils.data.Dataset):
    """uint8 ``(N, 3, 32, 32)`` images as a torch-fidelity input."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@torch.no_grad()
def generate(model: nn.Module, windows: TimeWindows, nfe: int, n: int, batch_size: int, seed: int,
             device: str) -> torch.Tensor:
    """``n`` uint8 samples of ``nfe`` Euler steps; noise batch ``i`` from stream ``cifar10-fid/nfe/i``
    (the same noise for every model: paired comparisons)."""
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        x0 = torch.randn((size, CHANNELS, SIZE, SIZE), generator=stream(seed, "cifar10-fid", nfe, i)).to(device)
        out.append(to_uint8(sample_few_step(model, x0, windows, nfe, strict=False)).cpu())
    return torch.cat(out)


def fid_score(generated: torch.Tensor, reference: torch.Tensor, cfg: Cifar10Config, f: FIDConfig) -> float:
    """FID between two uint8 image sets (torch-fidelity). The reference features are cached under
    ``checkpoint_dir/fid_cache``, keyed by extractor and ``n_reference``."""
    import torch_fidelity

    kwargs = {"feature_extractor": f.feature_extractor}
    if f.feature_extractor_weights_path:
        kwargs["feature_extractor_weights_path"] = f.feature_extractor_weights_path
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated), input2=UInt8Images(reference), fid=True, cache=True,
        cache_root=str(ckpt(cfg, "fid_cache")),
        input2_cache_name=f"cifar10-train-{f.n_reference}-{f.feature_extractor}",
        cuda=cfg.device.startswith("cuda"), batch_size=min(f.batch_size, 200), verbose=False,
        save_cpu_ram=f.save_cpu_ram, **kwargs)
    return float(metrics["frechet_inception_distance"])


def stage_fid(configs: dict, progress: bool = True) -> dict:
    """Rows ``{model, seed, windows, nfe, crosses_windows, fid, n_samples, n_reference}`` (the
    teacher's seed is None), written with the reference numbers to ``out_dir/fid.json``."""
    from torchvision.utils import save_image

    cfg: Cifar10Config = configs["cifar10"]
    students: StudentsConfig = configs["cifar10_students"]
    f: FIDConfig = configs["cifar10_fid"]
    reference = load_cifar10_uint8(cfg.data.root, "train")[0][: f.n_reference]
    runs = [("teacher", None, 1, f.teacher_nfe)]
    runs += [(name, seed, students.students[name].windows, f.nfe) for name, seed in students.runs()]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, seed, k, nfes in tqdm(runs, desc="cifar10 fid", disable=not progress):
        if seed is None:
            model, tag = load_teacher(cfg)[0], name
        else:
            model, tag = load_student(cfg, students, name, seed), f"{name}_seed{seed}"
        for nfe in nfes:
            images = generate(model, TimeWindows(k), nfe, f.n_samples, f.batch_size, cfg.seed, cfg.device)
            if f.grid_images:
                save_image(images[: f.grid_images].float() / 255, out_dir / f"samples_{tag}_nfe{nfe}.png",
                           nrow=8)
            rows.append({"model": name, "seed": seed, "windows": k, "nfe": nfe, "crosses_windows": nfe < k,
                         "fid": fid_score(images, reference, cfg, f), "n_samples": f.n_samples,
                         "n_reference": f.n_reference})
    protocol = our_protocol(f.n_samples, f.n_reference, f.feature_extractor)
    table, references = comparison_table(rows, protocol)
    result = {"rows": rows, "feature_extractor": f.feature_extractor, "protocol": protocol,
              "references": references}
    (out_dir / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "comparison.md").write_text(table)
    return {"rows": rows, "written": str(out_dir / "fid.json")}
