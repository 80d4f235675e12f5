"""The image tier's evaluation pipeline: the reference (domain classifier + cached features), sample
sets from one shared noise draw, their metric rows, and KL(student || teacher) rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from marflow_core import stream

from .config import ImagesConfig, ReferenceStageConfig, StudentsStageConfig, TableConfig
from .data import ImageSplit
from .evaluate import adaptive_teacher_samples, few_step_samples
from .tier import REFERENCE_DIR, load_split, load_student


@dataclass
class SampleSets:
    """Every sample set of the table, all from the noise ``x0``: ``students[(name, seed, nfe)]``."""

    x0: torch.Tensor
    teacher: torch.Tensor
    teacher_nfe: float
    students: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    train_real: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def sample_sets(images: ImagesConfig, students: StudentsStageConfig, cfg: TableConfig, root: Path,
                teacher: torch.nn.Module, split: ImageSplit, progress: bool = True) -> SampleSets:
    """Teacher (adaptive ODE) and every ``(student, seed, nfe)`` sampler on one noise draw of
    ``max(inception_samples, domain_samples)`` images."""
    n = max(cfg.inception_samples, cfg.domain_samples)
    x0 = torch.randn((n, *split.shape), generator=stream(cfg.seed, "table-noise")).to(images.device)
    tic = time.perf_counter()
    teacher_x, teacher_nfe = adaptive_teacher_samples(teacher, x0, cfg.teacher_method, cfg.teacher_rtol,
                                                      cfg.teacher_atol)
    sets = SampleSets(x0, teacher_x.cpu(), teacher_nfe, seconds={"teacher": time.perf_counter() - tic})
    runs = students.runs()
    for name, seed in tqdm(runs, desc="sampling", disable=not progress):
        model, windows, _ = load_student(name, seed, images, students, root)
        for nfe in cfg.nfe:
            tic = time.perf_counter()
            sets.students[(name, seed, nfe)] = few_step_samples(model, windows, nfe, x0).cpu()
            sets.seconds[f"{name} seed {seed} {nfe} NFE"] = time.perf_counter() - tic
    sets.train_real = split.train[torch.randperm(len(split.train), generator=stream(cfg.seed, "train-real"))[:n]]
    return sets
