"""Reflow pair banks: sharding, skipping finished shards, reproducibility, accuracy of x1."""

from __future__ import annotations

import pytest
import torch

from marflow_core import (
    GaussianMixtureTeacher,
    ReflowPairSampler,
    generate_reflow_pairs,
    load_pairs,
    odeint_adaptive,
)

F64 = torch.float64


@pytest.fixture
def teacher32() -> GaussianMixtureTeacher:
    # generate_reflow_pairs draws float32 noise, so the teacher is float32 too
    return GaussianMixtureTeacher([0.6, 0.4], [[1.5, 0.0], [-1.0, 1.0]], [0.4, 0.7])


def _exploding(x, t):
    raise AssertionError("a finished shard must not be regenerated")


def test_shards_count_skip_and_reproducibility(teacher32, tmp_path):
    kw = dict(n_pairs=10, shard_size=4, dim_shape=(2,), base_seed=3, steps=16, progress=False)
    paths = generate_reflow_pairs(teacher32, tmp_path / "a", **kw)
    assert len(paths) == 3 and len(set(paths)) == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in paths)
    sizes = [len(torch.load(p, weights_only=True)["x0"]) for p in paths]
    assert sizes == [4, 4, 2]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = generate_reflow_pairs(_exploding, tmp_path / "a", **kw)
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == mtimes
    other = generate_reflow_pairs(teacher32, tmp_path / "b", **kw)
    x0a, x1a = load_pairs(paths)
    x0b, x1b = load_pairs(other)
    assert x0a.shape == (10, 2) and torch.equal(x0a, x0b) and torch.equal(x1a, x1b)
    # shards are different draws, and another base seed gives another bank
    assert not torch.equal(x0a[:2], x0a[4:6])
    x0c, _ = load_pairs(generate_reflow_pairs(teacher32, tmp_path / "c", **{**kw, "base_seed": 4}))
    assert not torch.equal(x0a, x0c)


def test_x1_matches_fine_solve_and_noise_is_standard(teacher32, tmp_path):
    paths = generate_reflow_pairs(teacher32, tmp_path, 2000, 1000, (2,), steps=32, progress=False)
    x0, x1 = load_pairs(paths)
    ref = odeint_adaptive(teacher32.to(dtype=F64), x0.double(), (0.0, 1.0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x1.double(), ref, rtol=1e-4, atol=1e-4)
    assert abs(float(x0.mean())) < 0.1 and abs(float(x0.std()) - 1) < 0.05


def test_growing_bank_tops_up_its_last_shard(teacher32, tmp_path):
    """10 pairs (shards 4, 4, 2), then 12: the partial shard must be regenerated to 4 pairs."""
    kw = dict(shard_size=4, dim_shape=(2,), steps=8, progress=False)
    small = generate_reflow_pairs(teacher32, tmp_path, 10, **kw)
    first = small[0].stat().st_mtime_ns
    big = generate_reflow_pairs(teacher32, tmp_path, 12, **kw)
    x0, x1 = load_pairs(big)
    assert x0.shape == (12, 2) and x1.shape == (12, 2)
    assert big[0].stat().st_mtime_ns == first  # full shards are reused
    x0s, _ = load_pairs(generate_reflow_pairs(teacher32, tmp_path, 10, **kw))
    assert x0s.shape == (10, 2)


def test_changed_solver_settings_regenerate(teacher32, tmp_path):
    kw = dict(shard_size=4, dim_shape=(2,), progress=False)
    coarse = load_pairs(generate_reflow_pairs(teacher32, tmp_path, 4, steps=1, method="euler", **kw))
    fine = load_pairs(generate_reflow_pairs(teacher32, tmp_path, 4, steps=32, method="rk4", **kw))
    assert torch.equal(coarse[0], fine[0]) and not torch.allclose(coarse[1], fine[1])


def test_generate_validation(teacher32, tmp_path):
    with pytest.raises(ValueError):
        generate_reflow_pairs(teacher32, tmp_path, 0, 4, (2,), progress=False)
    with pytest.raises(ValueError):
        generate_reflow_pairs(teacher32, tmp_path, 4, 0, (2,), progress=False)


def test_reflow_pair_sampler_keeps_pairs_together():
    x0 = torch.arange(20, dtype=F64).reshape(10, 2)
    x1 = -x0
    wb = ReflowPairSampler(x0, x1, 16)(None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(wb.y_end, -wb.x_start, rtol=0, atol=0)
    assert wb.k.tolist() == [0] * 16
    assert torch.equal(wb.t_start, torch.zeros(16, dtype=F64)) and torch.equal(wb.t_end, torch.ones(16, dtype=F64))
    assert bool(((wb.t >= 0) & (wb.t < 1)).all())
    torch.testing.assert_close(wb.point(), wb.x_start * (1 - 2 * wb.t[:, None]), rtol=1e-14, atol=1e-14)
