"""The image tier's reference set: the held-out images' cached Inception and domain-classifier
features, the trained domain classifier and the held-out class frequencies (stage
``images_reference``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from marflow_core import stream
from marflow_core.atomic import atomic_torch_save, atomic_write_text
from marflow_core.integrity import verified_load, with_digest

from ..common.fingerprint import code_digest
from ..common.runs import prepare_run_dir
from .config import ImagesConfig, ReferenceStageConfig, TableConfig
from .data import ImageSplit, to_uint8_rgb
from .features import (
    INCEPTION,
    CachedFeatures,
    DigitClassifier,
    cache_features,
    class_mass_error,
    image_metrics,
    min_class_coverage,
    per_class_mass,
    train_classifier,
)
from .tier import REFERENCE_DIR, data_noise, load_split

#: the module that decides what the reference stage stores (with its import closure)
REFERENCE_MODULE = "replication.images.reference"


def reference_images(split: ImageSplit, cfg: ReferenceStageConfig,
                     noise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference set: the first ``reference_samples`` held-out images (all when 0), labels;
    one draw of the data law (``noise``, from stream ``(cfg.seed, "reference-law")``) when given."""
    n = cfg.reference_samples or len(split.heldout)
    x = split.heldout[:n]
    return (x if noise is None else noise(x, stream(cfg.seed, "reference-law"))), split.heldout_labels[:n]


def build_reference(images: ImagesConfig, cfg: ReferenceStageConfig, root: Path,
                    progress: bool = True) -> float:
    """Train the domain classifier and cache the reference set's Inception and classifier features
    under ``root/reference`` (found, not recomputed, when params and code are unchanged)."""
    tic = time.perf_counter()
    run_dir = root / REFERENCE_DIR
    prepare_run_dir(run_dir, {"images": asdict(images), "reference": asdict(cfg),
                              "code": code_digest([REFERENCE_MODULE])})
    if (run_dir / "reference.json").exists():
        return time.perf_counter() - tic
    split = load_split(images)
    if split.train_labels is None:
        raise ValueError(f"images.dataset = {images.dataset!r} has no labels: the domain classifier "
                         f"and the class-mass metric need a labelled dataset (digits or mnist)")
    noise = data_noise(images)
    classifier, accuracy = train_classifier(split, cfg.classifier_steps, cfg.classifier_batch,
                                            cfg.classifier_lr, cfg.seed, cfg.classifier_width, noise)
    x, labels = reference_images(split, cfg, noise)
    cache = run_dir / "fidelity_cache"
    uint8 = to_uint8_rgb(x)
    inception = cache_features(uint8, INCEPTION, cache)
    domain = cache_features(uint8, classifier, cache)
    # torch-fidelity caches a set's FID statistics on first use: compute them here (the set against
    # itself, from the cached features), so that the evaluation stage never writes into this folder
    self_scores = {}
    for name, cached, extractor in (("inception", inception, INCEPTION), ("domain", domain, classifier)):
        out = image_metrics(cached, cached, extractor, kid_subset_size=min(len(x), 100),
                            prc_neighborhood=min(3, len(x) - 1))
        self_scores[name] = {"fid": float(out["fid"])}
    freq = torch.bincount(labels, minlength=int(split.train_labels.max()) + 1).double() / len(labels)
    atomic_torch_save(with_digest({"classifier": classifier.state_dict(), "class_freq": freq}),
                      run_dir / "classifier.pt")
    atomic_write_text(json.dumps({"heldout_accuracy": accuracy, "n_reference": len(x), "self": self_scores,
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
    self_scores: dict  # FID of the reference set against itself, per feature space (~0)

    def domain_scores(self, x: torch.Tensor) -> dict[str, float]:
        """Against the held-out reference, in classifier features (torch-fidelity): domain FD,
        precision and recall; and the class masses: TV to the held-out frequencies and the coverage
        of the least-covered class (``min_class_coverage``). ``x`` in [-1, 1]."""
        n = min(len(x), self.n_reference)
        out = image_metrics(to_uint8_rgb(x), self.domain, self.classifier, kid_subset_size=min(n, 100),
                            prc_neighborhood=min(3, n - 1))
        mass = per_class_mass(self.classifier, x)
        return {"domain_fd": float(out["fid"]), "domain_precision": float(out["precision"]),
                "domain_recall": float(out["recall"]), "class_mass_error": class_mass_error(mass, self.class_freq),
                "class_coverage": min_class_coverage(mass, self.class_freq)}

    def teacher_scores(self, x: torch.Tensor, teacher_uint8: torch.Tensor) -> dict[str, float]:
        """Against the teacher's own samples (``teacher_uint8``, uint8 RGB), in classifier features:
        FD, KID, precision and recall, suffixed ``_teacher``: the law MA aligns the student with."""
        n = min(len(x), len(teacher_uint8))
        out = image_metrics(to_uint8_rgb(x), teacher_uint8, self.classifier, kid_subset_size=min(n, 100),
                            prc_neighborhood=min(3, n - 1))
        return {"domain_fd_teacher": float(out["fid"]), "domain_kid_teacher": float(out["kid_mean"]),
                "domain_precision_teacher": float(out["precision"]),
                "domain_recall_teacher": float(out["recall"])}

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
    state = verified_load(run_dir / "classifier.pt")
    split_shape = (images.channels, images.size, images.size)
    n_classes = len(state["class_freq"])
    classifier = DigitClassifier(split_shape[0], split_shape[1], n_classes, cfg.classifier_width)
    classifier.load_state_dict(state["classifier"])
    return Reference(classifier.eval().requires_grad_(False), meta["heldout_accuracy"], meta["n_reference"],
                     CachedFeatures(**meta["inception"]), CachedFeatures(**meta["domain"]),
                     state["class_freq"], meta["self"])


