"""The image tier's evaluation pipeline: the reference (domain classifier + cached features), sample
sets from one shared noise draw, their metric rows, and KL(student || teacher) rows."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from marflow_core import stream

from marflow_core.atomic import atomic_torch_save, atomic_write_text

from ..runs import prepare_run_dir, source_digest
from .config import ImagesConfig, ReferenceStageConfig, StudentsStageConfig, TableConfig
from .data import ImageSplit, to_uint8_rgb
from .evaluate import adaptive_teacher_samples, few_step_samples
from .features import (
    INCEPTION,
    CachedFeatures,
    DigitClassifier,
    cache_features,
    class_mass_error,
    image_metrics,
    per_class_mass,
    train_classifier,
)
from .tier import REFERENCE_DIR, load_split, load_student

#: the modules that decide what the reference stage stores
REFERENCE_SOURCES: tuple[str, ...] = ("config.py", "data.py", "features.py", "scoring.py")


def reference_images(split: ImageSplit, cfg: ReferenceStageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference set: the first ``reference_samples`` held-out images (all when 0), labels."""
    n = cfg.reference_samples or len(split.heldout)
    return split.heldout[:n], split.heldout_labels[:n]


def build_reference(images: ImagesConfig, cfg: ReferenceStageConfig, root: Path,
                    progress: bool = True) -> float:
    """Train the domain classifier and cache the reference set's Inception and classifier features
    under ``root/reference`` (found, not recomputed, when params and code are unchanged)."""
    tic = time.perf_counter()
    run_dir = root / REFERENCE_DIR
    prepare_run_dir(run_dir, {"images": asdict(images), "reference": asdict(cfg),
                              "code": source_digest(Path(__file__).parent, REFERENCE_SOURCES)})
    if (run_dir / "reference.json").exists():
        return time.perf_counter() - tic
    split = load_split(images)
    if split.train_labels is None:
        raise ValueError(f"images.dataset = {images.dataset!r} has no labels: the domain classifier "
                         f"and the class-mass metric need a labelled dataset (digits or mnist)")
    classifier, accuracy = train_classifier(split, cfg.classifier_steps, cfg.classifier_batch,
                                            cfg.classifier_lr, cfg.seed, cfg.classifier_width)
    x, labels = reference_images(split, cfg)
    cache = run_dir / "fidelity_cache"
    uint8 = to_uint8_rgb(x)
    inception = cache_features(uint8, INCEPTION, cache)
    domain = cache_features(uint8, classifier, cache)
    freq = torch.bincount(labels, minlength=int(split.train_labels.max()) + 1).double() / len(labels)
    atomic_torch_save({"classifier": classifier.state_dict(), "class_freq": freq}, run_dir / "classifier.pt")
    atomic_write_text(json.dumps({"heldout_accuracy": accuracy, "n_reference": len(x),
                                  "inception": asdict(inception), "domain": asdict(domain)},
                                 indent=1, sort_keys=True), run_dir / "reference.json")
    return time.perf_counter() - tic


@dataclass
class Reference:
    """The held-out reference: cached features in both spaces, the classifier, class frequencies."""

    classifier: DigitClassifier
    heldout_accuracy: float
    n_reference: int
    inception: CachedFeatures
    domain: CachedFeatures
    class_freq: torch.Tensor

    def domain_scores(self, x: torch.Tensor) -> dict[str, float]:
        """Domain FD (torch-fidelity, classifier features) and class-mass TV of ``x`` in [-1, 1]."""
        n = min(len(x), self.n_reference)
        out = image_metrics(to_uint8_rgb(x), self.domain, self.classifier, kid_subset_size=min(n, 100),
                            prc_neighborhood=min(3, n - 1))
        mass = class_mass_error(per_class_mass(self.classifier, x), self.class_freq)
        return {"domain_fd": float(out["fid"]), "class_mass_error": mass}

    def inception_scores(self, x: torch.Tensor, cfg: TableConfig) -> dict[str, float]:
        """FID, KID, precision, recall (torch-fidelity, TF-2015 Inception) of ``x`` in [-1, 1]."""
        out = image_metrics(to_uint8_rgb(x), self.inception, INCEPTION, cfg.kid_subset_size,
                            cfg.prc_neighborhood)
        return {"fid": float(out["fid"]), "kid": float(out["kid_mean"]), "kid_std": float(out["kid_std"]),
                "precision": float(out["precision"]), "recall": float(out["recall"])}


def load_reference(images: ImagesConfig, cfg: ReferenceStageConfig, root: Path) -> Reference:
    run_dir = root / REFERENCE_DIR
    if not (run_dir / "reference.json").exists():
        raise FileNotFoundError(f"no reference in {run_dir}: run the images_reference stage first (dvc repro)")
    meta = json.loads((run_dir / "reference.json").read_text())
    state = torch.load(run_dir / "classifier.pt", weights_only=True)
    split_shape = (images.channels, images.size, images.size)
    n_classes = len(state["class_freq"])
    classifier = DigitClassifier(split_shape[0], split_shape[1], n_classes, cfg.classifier_width)
    classifier.load_state_dict(state["classifier"])
    return Reference(classifier.eval().requires_grad_(False), meta["heldout_accuracy"], meta["n_reference"],
                     CachedFeatures(**meta["inception"]), CachedFeatures(**meta["domain"]),
                     state["class_freq"])


def score_rows(sets: "SampleSets", reference: Reference, cfg: TableConfig, progress: bool = True
               ) -> tuple[pd.DataFrame, float]:
    """One row per sample set: Inception metrics on the first ``inception_samples`` images, domain
    metrics on the first ``domain_samples``. Extra rows: ``train real`` and ``noise``."""
    tic = time.perf_counter()
    entries = [("teacher", -1, round(sets.teacher_nfe), sets.teacher)]
    entries += [(name, seed, nfe, x) for (name, seed, nfe), x in sets.students.items()]
    entries += [("train real", -1, 0, sets.train_real), ("noise", -1, 0, sets.noise)]
    rows = []
    for method, seed, nfe, x in tqdm(entries, desc="scoring", disable=not progress):
        row = {"method": method, "seed": seed, "nfe": nfe}
        row |= reference.inception_scores(x[: cfg.inception_samples], cfg)
        row |= reference.domain_scores(x[: cfg.domain_samples])
        rows.append(row)
    return pd.DataFrame(rows), time.perf_counter() - tic


@dataclass
class SampleSets:
    """Every sample set of the table, all from the noise ``x0``: ``students[(name, seed, nfe)]``."""

    x0: torch.Tensor
    teacher: torch.Tensor
    teacher_nfe: float
    students: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    train_real: torch.Tensor | None = None
    noise: torch.Tensor | None = None
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
    sets.noise = torch.randn((n, *split.shape), generator=stream(cfg.seed, "noise-row")).clamp(-1, 1)
    return sets


def kl_rows(sets: SampleSets, teacher: torch.nn.Module, students: StudentsStageConfig,
            images: ImagesConfig, cfg: TableConfig, root: Path, progress: bool = True
            ) -> tuple[pd.DataFrame, float]:
    """KL(student || teacher) for ``cfg.kl.students`` x their seeds x ``cfg.kl.nfe`` on the first
    ``cfg.kl.n_samples`` noise rows, plus the sanity row ``teacher (CNF)``: the teacher's own
    ``teacher_steps``-step samples against its own CNF density (about 0 up to ODE error)."""
    from .kl import FlatField, kl_student_teacher

    k = cfg.kl
    tic = time.perf_counter()
    shape = tuple(sets.x0.shape[1:])
    x0 = sets.x0[: k.n_samples].flatten(1)
    flat_teacher = FlatField(teacher, shape)
    rows = []
    jobs = [(name, seed, nfe) for name in k.students for seed in students.students[name].seeds
            for nfe in k.nfe]
    for name, seed, nfe in tqdm(jobs, desc="KL", disable=not progress):
        model, windows, _ = load_student(name, seed, images, students, root)
        est = kl_student_teacher(FlatField(model, shape), flat_teacher, x0, windows, nfe,
                                 k.teacher_steps, k.teacher_solver, k.probes, k.groups,
                                 seed=cfg.seed, chunk=k.chunk)
        rows.append(_kl_row(name, seed, nfe, est))
    rows.append(teacher_self_kl(flat_teacher, x0, k, cfg.seed))
    return pd.DataFrame(rows), time.perf_counter() - tic


def _kl_row(method: str, seed: int, nfe: int, est) -> dict:
    return {"method": method, "seed": seed, "nfe": nfe, "kl": est.kl, "kl_stderr": est.stderr,
            "kl_hutchinson_stderr": est.hutchinson_stderr, "kl_fold_fraction": est.fold_fraction}


@torch.no_grad()
def teacher_self_kl(flat_teacher, x0: torch.Tensor, k, seed: int) -> dict:
    """Sanity row: the teacher's own ``teacher_steps``-step samples, their log-density tracked
    forward through its CNF (Hutchinson, probes fixed per sample), scored by the backward CNF of
    ``teacher_logp``: ``KL ~ 0`` up to the ODE error and the Hutchinson noise (in the stderr)."""
    from marflow_core import flow_with_logdet, uniform_grid

    from ..toy2d.metrics import mc_mean, standard_normal_log_prob
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
