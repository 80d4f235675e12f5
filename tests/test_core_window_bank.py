"""Window banks (PeRFlow pairs generated once), flow matching of a teacher, and the UNet adapter,
against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from marflow_core import (
    FlowMatchingObjective,
    GaussianMixtureTeacher,
    InvalidParameter,
    TimeWindows,
    WindowBankConfig,
    WindowBankSampler,
    generate_window_bank,
    load_window_bank,
)
from marflow_core.window_bank import window_bank_shard

F64 = torch.float64
MU, S = torch.tensor([1.5, -0.5], dtype=F64), 0.4


def gaussian_teacher() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher([1.0], [MU.tolist()], [S], dtype=F64)


def exact_window_map(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flow map of the rectified flow of N(MU, S^2 I) from time a to b (per row): with
    sigma_t = sqrt(t^2 S^2 + (1 - t)^2), x_b = b MU + sigma_b / sigma_a (x_a - a MU)."""
    sigma = lambda t: torch.sqrt(t**2 * S**2 + (1 - t) ** 2)[:, None]  # noqa: E731
    return b[:, None] * MU + sigma(b) / sigma(a) * (x - a[:, None] * MU)


def test_bank_end_points_are_the_teacher_window_map():
    windows = TimeWindows(4)
    data = torch.randn(50, 2, dtype=F64)
    cfg = WindowBankConfig(n_entries=256, shard_size=256, teacher_steps=8, solver="rk4", batch_size=100)
    shard = window_bank_shard(gaussian_teacher(), data, windows, 256, seed=3, config=cfg)
    a, b = windows.bounds(shard["k"], shard["x_start"])
    expected = exact_window_map(shard["x_start"], a, b)
    assert torch.allclose(shard["y_end"], expected, atol=1e-6)


def test_bank_starts_are_noised_data_in_uniform_windows():
    """Data = one point c: x_start ~ N(t_k c, (1 - t_k)^2 I) in window k; k uniform over 4 windows."""
    windows, c = TimeWindows(4), torch.tensor([2.0, -1.0], dtype=F64)
    data = c.expand(10, 2).clone()
    cfg = WindowBankConfig(n_entries=8000, shard_size=8000, teacher_steps=1, solver="euler")
    shard = window_bank_shard(gaussian_teacher(), data, windows, 8000, seed=0, config=cfg)
    counts = torch.bincount(shard["k"], minlength=4).to(F64)
    assert torch.all((counts / 8000 - 0.25).abs() < 4 * math.sqrt(0.25 * 0.75 / 8000))
    for k in range(4):
        t_k = k / 4
        x = shard["x_start"][shard["k"] == k]
        n = len(x)
        assert torch.allclose(x.mean(0), t_k * c, atol=4 * (1 - t_k) / math.sqrt(n) + 1e-12)
        if k > 0:
            assert torch.allclose(x.std(0), torch.full((2,), 1 - t_k, dtype=F64), rtol=0.08)
        else:
            assert torch.allclose(x.std(0), torch.ones(2, dtype=F64), rtol=0.08)


def test_bank_is_seeded_and_shards_are_reused(tmp_path):
    windows, data = TimeWindows(2), torch.randn(20, 2, dtype=F64)
    cfg = WindowBankConfig(n_entries=30, shard_size=16, teacher_steps=2, solver="heun")
    paths = generate_window_bank(gaussian_teacher(), data, windows, tmp_path, cfg, base_seed=1,
                                 progress=False)
    assert len(paths) == 2
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = generate_window_bank(gaussian_teacher(), data, windows, tmp_path, cfg, base_seed=1,
                                 progress=False)
    assert [p.stat().st_mtime_ns for p in again] == stamps  # found, not regenerated
    bank = load_window_bank(paths)
    assert bank["x_start"].shape == (30, 2) and bank["k"].shape == (30,)
    other = generate_window_bank(gaussian_teacher(), data, windows, tmp_path / "b", cfg, base_seed=2,
                                 progress=False)
    assert not torch.equal(load_window_bank(other)["x_start"], bank["x_start"])
    finer = WindowBankConfig(n_entries=30, shard_size=16, teacher_steps=3, solver="heun")
    redone = generate_window_bank(gaussian_teacher(), data, windows, tmp_path, finer, base_seed=1,
                                  progress=False)
    assert [p.stat().st_mtime_ns for p in redone] != stamps  # other solver settings: regenerated


def test_bank_sampler_draws_rows_and_times_inside_their_window():
    windows = TimeWindows(4)
    n = 40
    bank = {"x_start": torch.arange(n, dtype=F64)[:, None].repeat(1, 2),
            "y_end": -torch.arange(n, dtype=F64)[:, None].repeat(1, 2),
            "k": torch.arange(n) % 4}
    sampler = WindowBankSampler.from_bank(windows, bank, batch_size=500)
    wb = sampler(None, torch.Generator().manual_seed(0))
    rows = wb.x_start[:, 0].long()
    assert torch.equal(wb.y_end[:, 0], -wb.x_start[:, 0])
    assert torch.equal(wb.k, rows % 4)
    assert torch.all(wb.t_start == wb.k / 4) and torch.all(wb.t_end == (wb.k + 1) / 4)
    assert torch.all((wb.t >= wb.t_start) & (wb.t <= wb.t_end))
    u = (wb.t - wb.t_start) / (wb.t_end - wb.t_start)  # uniform within the window
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 500)
    again = sampler(None, torch.Generator().manual_seed(0))
    assert torch.equal(again.t, wb.t) and torch.equal(again.x_start, wb.x_start)
    with pytest.raises(ValueError, match="window index 3"):
        WindowBankSampler.from_bank(TimeWindows(2), bank, 4)


def test_window_bank_config_names_bad_values():
    for key, value in (("n_entries", 0), ("teacher_steps", 0), ("solver", "rk45"), ("batch_size", 0)):
        with pytest.raises(InvalidParameter, match=key):
            WindowBankConfig(**{key: value})


def test_flow_matching_loss_closed_forms():
    """Data = one point c. The exact velocity (c - x) / (1 - t) has loss 0; v = 0 has per-entry
    loss E (c_i - x0_i)^2 averaged over i = |c|^2 / D + 1."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    batch = c.expand(20000, 3).clone()
    gen = torch.Generator().manual_seed(0)
    exact = lambda x, t: (c - x) / (1 - t[:, None])  # noqa: E731
    terms = FlowMatchingObjective()(exact, batch, 0, gen)
    assert float(terms.total) < 1e-20
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    loss = float(FlowMatchingObjective()(zero, batch, 0, torch.Generator().manual_seed(1)).total)
    expected = float(c.pow(2).sum()) / 3 + 1
    # per-entry variance of (c_i - x0_i)^2 is 4 c_i^2 + 2; the mean over 3 x 20000 entries
    se = math.sqrt(float((4 * c.pow(2) + 2).mean()) / 60000)
    assert abs(loss - expected) < 4 * se


def test_unet_config_and_velocity_adapter():
    pytest.importorskip("diffusers")
    from marflow_core.unet import UNetConfig, UNetVelocity

    with pytest.raises(InvalidParameter, match="norm_groups"):
        UNetConfig(widths=[12, 24], norm_groups=8)
    with pytest.raises(InvalidParameter, match="attention_levels"):
        UNetConfig(widths=[16, 32], attention_levels=[2])
    with pytest.raises(InvalidParameter, match="does not divide"):
        UNetVelocity(1, 6, UNetConfig(widths=[8, 16, 16], norm_groups=8))
    torch.manual_seed(0)
    model = UNetVelocity(1, 8, UNetConfig(widths=[8, 16], norm_groups=4, time_scale=500.0))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    v = model(x, t)
    assert v.shape == x.shape
    assert torch.allclose(v, model.unet(x, 500.0 * t).sample)  # core time enters as 500 t
    assert torch.allclose(model(x, 0.5), model.unet(x, torch.full((3,), 250.0)).sample)
