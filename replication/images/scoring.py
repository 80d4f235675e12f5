"""The image tier's evaluation pipeline: sample sets from one shared noise draw, their metric rows
against the reference (``reference.py``), and KL(student || teacher) rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from marflow_core import TimeWindows, stream
from marflow_core.errors import require_finite

from ..common.headline import check_finite
from .config import ImagesConfig, StudentsStageConfig, TableConfig
from .data import ImageSplit, to_uint8_rgb
from .evaluate import adaptive_teacher_samples, few_step_samples
from .reference import Reference
from .tier import data_noise, load_student


def score_rows(sets: SampleSets, reference: Reference, cfg: TableConfig, progress: bool = True
               ) -> tuple[pd.DataFrame, float]:
    """One row per sample set: Inception metrics on the first ``inception_samples`` images (students
    at ``inception_nfe`` only), domain metrics on the first ``domain_samples`` against the held-out
    split and against the teacher's ``teacher_reference`` samples (``*_teacher``). Extra rows:
    ``train real`` and ``noise``; rows without a student seed have ``seed = -1``."""
    tic = time.perf_counter()
    entries = [("teacher", -1, round(sets.teacher_nfe), sets.teacher)]
    entries += [(name, seed, nfe, x) for (name, seed, nfe), x in sets.students.items()]
    entries += [("train real", -1, 0, sets.train_real), ("noise", -1, 0, sets.noise)]
    teacher_uint8 = to_uint8_rgb(sets.teacher_reference)
    rows = []
    for method, seed, nfe, x in tqdm(entries, desc="scoring", disable=not progress):
        row = {"method": method, "seed": seed, "nfe": nfe}
        if seed < 0 or nfe in cfg.inception_nfe:
            row |= reference.inception_scores(x[: cfg.inception_samples], cfg)
        row |= reference.domain_scores(x[: cfg.domain_samples])
        row |= reference.teacher_scores(x[: cfg.domain_samples], teacher_uint8)
        rows.append(row)
    return pd.DataFrame(rows), time.perf_counter() - tic


@dataclass
class SampleSets:
    """Every sample set of the table: ``students[(name, seed, nfe)]`` from the noise ``x0[seed]`` of
    its training seed; ``teacher`` from ``x0[0]`` (so seed 0's rows and the teacher's share noise);
    ``teacher_reference`` from noise of its own."""

    x0: dict[int, torch.Tensor]
    teacher: torch.Tensor
    teacher_nfe: float
    teacher_reference: torch.Tensor | None = None
    students: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    train_real: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def table_noise(cfg: TableConfig, seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The evaluation noise of training seed ``seed``: ``n`` standard normals of ``shape`` from stream
    ``(cfg.seed, "table-noise", seed)``; the students of one seed share it (common random numbers),
    different seeds do not (so intervals over seeds include the evaluation noise)."""
    return torch.randn((n, *shape), generator=stream(cfg.seed, "table-noise", seed))


def sample_sets(images: ImagesConfig, students: StudentsStageConfig, cfg: TableConfig, root: Path,
                teacher: torch.nn.Module, split: ImageSplit, progress: bool = True) -> SampleSets:
    """Teacher (adaptive ODE, on seed 0's noise), the teacher reference set and every
    ``(student, seed, nfe)`` sampler on its seed's noise, ``max(inception_samples, domain_samples)``
    images each."""
    n = max(cfg.inception_samples, cfg.domain_samples)
    runs = students.runs()
    seeds = sorted({0, *(seed for _, seed in runs)})
    x0 = {seed: table_noise(cfg, seed, n, split.shape).to(images.device) for seed in seeds}
    tic = time.perf_counter()
    teacher_x, teacher_nfe = adaptive_teacher_samples(teacher, x0[0], cfg.teacher_method, cfg.teacher_rtol,
                                                      cfg.teacher_atol)
    require_finite(teacher_x, "teacher samples")
    sets = SampleSets(x0, teacher_x.cpu(), teacher_nfe, seconds={"teacher": time.perf_counter() - tic})
    tic = time.perf_counter()
    ref_noise = torch.randn((cfg.teacher_reference_samples, *split.shape),
                            generator=stream(cfg.seed, "teacher-reference")).to(images.device)
    reference, _ = adaptive_teacher_samples(teacher, ref_noise, cfg.teacher_method, cfg.teacher_rtol,
                                            cfg.teacher_atol)
    require_finite(reference, "teacher reference samples")
    sets.teacher_reference = reference.cpu()
    sets.seconds["teacher reference"] = time.perf_counter() - tic
    for name, seed in tqdm(runs, desc="sampling", disable=not progress):
        model, windows, _ = load_student(name, seed, images, students, root)
        for nfe in cfg.nfe:
            tic = time.perf_counter()
            samples = few_step_samples(model, windows, nfe, x0[seed]).cpu()
            require_finite(samples, f"{name} seed {seed}, {nfe}-NFE samples")
            sets.students[(name, seed, nfe)] = samples
            sets.seconds[f"{name} seed {seed} {nfe} NFE"] = time.perf_counter() - tic
    real = split.train[torch.randperm(len(split.train), generator=stream(cfg.seed, "train-real"))[:n]]
    noise = data_noise(images)  # the training images as the teacher saw them: draws of the data law
    sets.train_real = real if noise is None else noise(real, stream(cfg.seed, "train-real-law"))
    sets.noise = torch.randn((n, *split.shape), generator=stream(cfg.seed, "noise-row")).clamp(-1, 1)
    return sets


def kl_rows(sets: SampleSets, teacher: torch.nn.Module, students: StudentsStageConfig,
            images: ImagesConfig, cfg: TableConfig, root: Path, progress: bool = True
            ) -> tuple[pd.DataFrame, float]:
    """KL(student || teacher) for ``cfg.kl.students`` x their seeds x ``cfg.kl.nfe`` on the first
    ``cfg.kl.n_samples`` rows of each seed's noise, plus two floor rows: ``teacher (Euler)`` at each
    NFE (the teacher's own ``nfe``-step Euler sampler: what discretisation alone costs) and the
    sanity row ``teacher (CNF)`` (the teacher's samples against its own CNF density: about 0 up to
    ODE and Hutchinson error). The estimator's accuracy: with ``refined_steps``, seed 0 of every cell,
    the floor rows and the sanity row are scored again with that many teacher steps (``kl_refined``,
    ``kl_refined_stderr``)."""
    from .kl import FlatField

    k = cfg.kl
    tic = time.perf_counter()
    shape = tuple(sets.x0[0].shape[1:])
    flat_teacher = FlatField(teacher, shape)
    rows = []
    jobs = [(name, seed, nfe) for name in k.students for seed in students.students[name].seeds
            for nfe in k.nfe]
    for name, seed, nfe in tqdm(jobs, desc="KL", disable=not progress):
        model, windows, _ = load_student(name, seed, images, students, root)
        x0 = sets.x0[seed][: k.n_samples].flatten(1)
        rows.append(_kl_cell(name, seed, nfe, FlatField(model, shape), flat_teacher, x0, windows, k,
                             cfg.seed, refine=seed == 0))
    x0 = sets.x0[0][: k.n_samples].flatten(1)
    for nfe in tqdm(k.nfe, desc="KL teacher (Euler)", disable=not progress):
        rows.append(_kl_cell(TEACHER_EULER, -1, nfe, flat_teacher, flat_teacher, x0, TimeWindows(1), k,
                             cfg.seed, refine=True))
    row = teacher_self_kl(flat_teacher, x0, k, cfg.seed)
    if k.refined_steps:
        fine = teacher_self_kl(flat_teacher, x0, replace(k, teacher_steps=k.refined_steps), cfg.seed)
        row |= {"kl_refined": fine["kl"], "kl_refined_stderr": fine["kl_stderr"]}
    rows.append(row)
    check_finite(rows, ("kl", "kl_stderr"), "KL table", keys=("method", "seed", "nfe"))
    return pd.DataFrame(rows), time.perf_counter() - tic


def _kl_cell(method: str, seed: int, nfe: int, student, flat_teacher, x0: torch.Tensor, windows, k,
             seed_base: int, refine: bool) -> dict:
    """One KL row, scored again with ``k.refined_steps`` teacher steps when ``refine`` (and on)."""
    from .kl import kl_student_teacher

    def estimate(steps: int):
        return kl_student_teacher(student, flat_teacher, x0, windows, nfe, steps, k.teacher_solver,
                                  k.probes, k.groups, seed=seed_base, chunk=k.chunk)

    row = _kl_row(method, seed, nfe, estimate(k.teacher_steps))
    if refine and k.refined_steps:
        fine = estimate(k.refined_steps)
        row |= {"kl_refined": fine.kl, "kl_refined_stderr": fine.stderr}
    return row


#: the teacher sampled like a one-window student (``nfe`` Euler steps): the KL that discretisation
#: alone gives, the floor every student row is read against
TEACHER_EULER = "teacher (Euler)"


def _kl_row(method: str, seed: int, nfe: int, est) -> dict:
    return {"method": method, "seed": seed, "nfe": nfe, "kl": est.kl, "kl_stderr": est.stderr,
            "kl_hutchinson_stderr": est.hutchinson_stderr, "kl_fold_fraction": est.fold_fraction}


@torch.no_grad()
def teacher_self_kl(flat_teacher, x0: torch.Tensor, k, seed: int) -> dict:
    """Sanity row: the teacher's own ``teacher_steps``-step samples, their log-density tracked
    forward through its CNF (Hutchinson, probes fixed per sample), scored by the backward CNF of
    ``teacher_logp``: ``KL ~ 0`` up to the ODE error and the Hutchinson noise (in the stderr)."""
    from marflow_core import flow_with_logdet, uniform_grid

    from ..common.stats import mc_mean, standard_normal_log_prob
    from .kl import teacher_logp

    diffs, ses = [], []
    for i in range(0, len(x0), k.chunk):
        xb = x0[i:i + k.chunk].double()
        field = lambda x, t: flat_teacher(x.float(), t.float()).double()  # noqa: E731
        flow = flow_with_logdet(field, xb, uniform_grid(0.0, 1.0, k.teacher_steps, xb), k.teacher_solver,
                                "hutchinson", k.probes, generator=stream(seed, "teacher-self-kl", i))
        log_q = standard_normal_log_prob(xb) - flow.logdet
        log_p, se = teacher_logp(flat_teacher, flow.x.float(), k.teacher_steps, k.teacher_solver, k.probes,
                                 stream(seed, "teacher-self-kl-back", i), k.groups, chunk=k.chunk)
        diffs.append(log_q - log_p)
        ses.append(se)
    d, se = torch.cat(diffs), torch.cat(ses)
    est = mc_mean(d)
    return {"method": "teacher (CNF)", "seed": -1, "nfe": 4 * k.teacher_steps if k.teacher_solver.startswith("rk4")
            else k.teacher_steps, "kl": est.value, "kl_stderr": est.stderr,
            "kl_hutchinson_stderr": float((se.pow(2).mean() / len(se)).sqrt()), "kl_fold_fraction": 0.0}
