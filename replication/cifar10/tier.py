"""CIFAR-10 stages on the shared ``marflow_core`` training loop.

Images ``(B, 3, 32, 32)`` in ``[-1, 1]`` are flattened to ``(B, 3072)`` for the core (its samplers,
losses and MA term work on flat vectors); ``FlatUNet`` reshapes around a diffusers ``UNet2DModel``.

- ``teacher``: 1-rectified flow, i.e. flow matching with independent pairs ``(x0 ~ N(0, I), x1 ~ data)``,
  which is a ``WindowBatch`` with the single window ``[0, 1]`` (``FlowMatchingSampler``);
- ``pairs``: the reflow pair bank ``(x0, Phi^T(x0))`` (``generate_reflow_pairs``);
- ``students``: each initialised from the teacher's weights, trained by ``DistillationObjective``
  with ``ReflowPairSampler`` (reflow) or ``PeRFlowSampler`` (noised-data window starts), plus the MA
  term when ``ma_weight`` > 0;
- ``fid``: Euler samples at each NFE (``sample_few_step``), FID with torch-fidelity against the
  training images; a JSON of rows next to the reference numbers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from marflow_core import (
    DistillationObjective,
    PeRFlowSampler,
    ReflowPairSampler,
    TimeWindows,
    TrainConfig,
    VelocityTeacher,
    WindowBatch,
    generate_reflow_pairs,
    load_checkpoint,
    load_pairs,
    sample_few_step,
    stream,
    train,
)

from .config import Cifar10Config, OptimConfig, StudentConfig, UNetConfig
from .data import load_cifar10, load_cifar10_uint8, to_uint8

SHAPE = (3, 32, 32)
DIM = 3 * 32 * 32


class FlatUNet(nn.Module):
    """``v(x, t)`` with ``x: (B, 3072)``, ``t: (B,)`` in ``[0, 1]``: a ``UNet2DModel`` on
    ``x.reshape(B, 3, 32, 32)`` at timestep ``time_scale * t``, flattened back."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import AttnProcessor

        n = len(cfg.block_out_channels)
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
        self.unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                                block_out_channels=tuple(cfg.block_out_channels),
                                layers_per_block=cfg.layers_per_block, down_block_types=down,
                                up_block_types=up, norm_num_groups=cfg.norm_num_groups,
                                dropout=cfg.dropout, attention_head_dim=None if n else 8)
        for module in self.unet.modules():  # plain attention: its double backward works on CPU
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor())
        self.time_scale = cfg.time_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = self.unet(x.reshape(b, *SHAPE), t.reshape(-1).expand(b) * self.time_scale).sample
        return out.reshape(b, -1)


@dataclass
class FlowMatchingSampler:
    """1-rectified flow: ``x_s = eps ~ N(0, I)``, ``y_T = x1``, one window, ``t ~ U[0, 1)``."""

    def __call__(self, x1: torch.Tensor, generator: torch.Generator | None) -> WindowBatch:
        eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype).to(x1.device)
        zeros = torch.zeros_like(t)
        return WindowBatch(eps, x1, zeros.long(), t, zeros, torch.ones_like(t))


@dataclass
class OnDevice:
    """Moves the window batch of a CPU-held sampler (a pair bank) to ``device``."""

    sampler: ReflowPairSampler
    device: str

    def __call__(self, batch, generator: torch.Generator | None) -> WindowBatch:
        wb = self.sampler(batch, generator)
        return WindowBatch(*(getattr(wb, f.name).to(self.device) for f in dataclasses.fields(wb)))


def data_batches(images: torch.Tensor, batch_size: int, hflip: bool, device: str):
    """``batch_fn(step, generator)``: ``batch_size`` random training images, flattened, on ``device``."""

    def batch_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx]
        if hflip:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.reshape(batch_size, -1).to(device)

    return batch_fn


def train_config(opt: OptimConfig, seed: int) -> TrainConfig:
    return TrainConfig(steps=opt.steps, lr=opt.lr, seed=seed, checkpoint_every=opt.checkpoint_every,
                       log_every=opt.log_every, warmup=opt.warmup, grad_clip=opt.grad_clip)


def ckpt(cfg: Cifar10Config, *parts: str) -> Path:
    return Path(cfg.checkpoint_dir).joinpath(*parts)


def model_meta(cfg: Cifar10Config, role: str, **extra) -> dict:
    return {"tier": "cifar10", "role": role, "model": dataclasses.asdict(cfg.model), **extra}


def load_teacher(cfg: Cifar10Config) -> FlatUNet:
    """The trained teacher, frozen, in eval mode on ``cfg.device``."""
    model = FlatUNet(cfg.model)
    load_checkpoint(ckpt(cfg, "teacher", "last.pt"), model, model_meta(cfg, "teacher"))
    return model.to(cfg.device).eval().requires_grad_(False)


def train_images(cfg: Cifar10Config) -> torch.Tensor:
    return load_cifar10(cfg.data.root, "train")[0][: cfg.data.n_train]


def stage_teacher(cfg: Cifar10Config, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    model = FlatUNet(cfg.model).to(cfg.device)
    objective = DistillationObjective(FlowMatchingSampler())
    batch_fn = data_batches(train_images(cfg), cfg.teacher.batch_size, cfg.data.hflip, cfg.device)
    result = train(model, objective, batch_fn, train_config(cfg.teacher, cfg.seed), ckpt(cfg, "teacher"),
                   progress=progress, desc="cifar10 teacher", meta=model_meta(cfg, "teacher"))
    return {"steps": result.steps, "last": result.history[-1] if result.history else {}}


def stage_pairs(cfg: Cifar10Config, progress: bool = True) -> dict:
    teacher = load_teacher(cfg)
    p = cfg.pairs
    paths = generate_reflow_pairs(teacher, ckpt(cfg, "pairs"), p.n_pairs, p.shard_size, (DIM,),
                                  base_seed=cfg.seed, steps=p.steps, method=p.solver, device=cfg.device,
                                  progress=progress)
    return {"shards": len(paths), "n_pairs": p.n_pairs}


def build_student_objective(cfg: Cifar10Config, student: StudentConfig, teacher: FlatUNet):
    """``(objective, batch_fn)`` of one student."""
    ma = dataclasses.replace(cfg.ma, weight=student.ma_weight) if student.ma_weight > 0 else None
    bs = cfg.student_optim.batch_size
    if student.method == "reflow":
        p = cfg.pairs
        shards = sorted(ckpt(cfg, "pairs").glob("pairs_seed*.pt"))
        if not shards:
            raise FileNotFoundError(f"no reflow pairs in {ckpt(cfg, 'pairs')}: run --stage pairs first")
        x0, x1 = load_pairs(shards)
        sampler = OnDevice(ReflowPairSampler(x0[: p.n_pairs], x1[: p.n_pairs], bs), cfg.device)
        batch_fn = lambda step, g: None  # noqa: E731  the pair bank is the data
    else:
        sampler = PeRFlowSampler(TimeWindows(student.windows), teacher, student.teacher_steps,
                                 student.teacher_solver, "noised_data")
        batch_fn = data_batches(train_images(cfg), bs, cfg.data.hflip, cfg.device)
    teacher_for_ma = VelocityTeacher(teacher, cfg.t_max) if ma is not None else None
    return DistillationObjective(sampler, teacher_for_ma, ma), batch_fn


def student_meta(cfg: Cifar10Config, name: str) -> dict:
    return model_meta(cfg, "student", name=name, student=dataclasses.asdict(cfg.students[name]))


def stage_students(cfg: Cifar10Config, only: list[str] | None = None, progress: bool = True) -> dict:
    unknown = sorted(set(only or []) - set(cfg.students))
    if unknown:
        raise KeyError(f"--student {unknown[0]!r}: not in students {sorted(cfg.students)}")
    teacher = load_teacher(cfg)
    out = {}
    for name, student in cfg.students.items():
        if only and name not in only:
            continue
        model = FlatUNet(cfg.model).to(cfg.device)
        model.load_state_dict(teacher.state_dict())  # students start from the teacher
        model.requires_grad_(True)
        objective, batch_fn = build_student_objective(cfg, student, teacher)
        result = train(model, objective, batch_fn, train_config(cfg.student_optim, cfg.seed),
                       ckpt(cfg, "students", name), progress=progress, desc=f"cifar10 {name}",
                       meta=student_meta(cfg, name))
        out[name] = {"steps": result.steps, "last": result.history[-1] if result.history else {}}
    return out


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
        x0 = torch.randn((size, DIM), generator=stream(seed, "cifar10-fid", nfe, i)).to(device)
        x1 = sample_few_step(model, x0, windows, nfe, strict=False)
        out.append(to_uint8(x1.reshape(size, *SHAPE)).cpu())
    return torch.cat(out)


def fid_score(generated: torch.Tensor, reference: torch.Tensor, cfg: Cifar10Config) -> float:
    """FID between two uint8 image sets (torch-fidelity). The reference features are cached under
    ``checkpoint_dir/fid_cache``, keyed by extractor and ``n_reference``."""
    import torch_fidelity

    f = cfg.fid
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


def load_student(cfg: Cifar10Config, name: str) -> FlatUNet:
    model = FlatUNet(cfg.model)
    load_checkpoint(ckpt(cfg, "students", name, "last.pt"), model, student_meta(cfg, name))
    return model.to(cfg.device).eval()


def stage_fid(cfg: Cifar10Config) -> dict:
    """Rows ``{model, windows, nfe, crosses_windows, fid, n_samples}``, written to ``out_dir/fid.json``."""
    from torchvision.utils import save_image

    from .references import load_cifar10_references

    f = cfg.fid
    reference = load_cifar10_uint8(cfg.data.root, "train")[0][: f.n_reference]
    models = {"teacher": (load_teacher(cfg), 1, f.teacher_nfe)}
    for name, student in cfg.students.items():
        models[name] = (load_student(cfg, name), student.windows, f.nfe)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (model, k, nfes) in models.items():
        for nfe in nfes:
            images = generate(model, TimeWindows(k), nfe, f.n_samples, f.batch_size, cfg.seed, cfg.device)
            if f.grid_images:
                save_image(images[: f.grid_images].float() / 255, out_dir / f"samples_{name}_nfe{nfe}.png",
                           nrow=8)
            rows.append({"model": name, "windows": k, "nfe": nfe, "crosses_windows": nfe < k,
                         "fid": fid_score(images, reference, cfg), "n_samples": f.n_samples,
                         "n_reference": f.n_reference})
    result = {"rows": rows, "feature_extractor": f.feature_extractor,
              "references": load_cifar10_references()["entries"]}
    (out_dir / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
