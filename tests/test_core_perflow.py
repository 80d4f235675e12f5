"""Windows, straight segments, the PeRFlow window sampler and the trajectory-matching loss."""

from __future__ import annotations

import pytest
import torch

from marflow_core import (
    PeRFlowSampler,
    TimeWindows,
    odeint_adaptive,
    sample_few_step,
    segment_point,
    segment_velocity,
    trajectory_matching_loss,
)

F64 = torch.float64


def test_window_index_at_boundaries():
    w = TimeWindows(4)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0, 0.25 - 1e-12, 0.75, 0.999, 0.5 + 1e-12], dtype=F64)
    assert w.index(t).tolist() == [0, 1, 2, 3, 0, 3, 3, 2]
    t32 = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float32)
    assert w.index(t32).tolist() == [0, 1, 2, 3, 3]
    assert TimeWindows(1).index(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 0, 0]
    lo, hi = w.bounds(torch.tensor([0, 3]), torch.zeros(1, dtype=F64))
    assert lo.tolist() == [0.0, 0.75] and hi.tolist() == [0.25, 1.0]


def test_window_validation():
    for bad in [dict(n_windows=0), dict(n_windows=2.5), dict(boundaries=[0.0, 0.5]),
                dict(boundaries=[0.1, 1.0]), dict(boundaries=[0.0, 0.6, 0.4, 1.0])]:
        with pytest.raises(ValueError):
            TimeWindows(**bad)


def test_step_grid():
    w = TimeWindows(4)
    g = w.step_grid(8)
    torch.testing.assert_close(g, torch.linspace(0, 1, 9, dtype=F64))
    for n in [4, 5, 6, 7, 9, 13]:
        g = w.step_grid(n)
        assert len(g) == n + 1 and bool((g[1:] > g[:-1]).all())
        assert all(bool((g - b).abs().min() < 1e-15) for b in [0.0, 0.25, 0.5, 0.75, 1.0])
        per_window = torch.bincount(w.index(0.5 * (g[1:] + g[:-1])), minlength=4)
        assert int(per_window.min()) >= 1 and int(per_window.max()) - int(per_window.min()) <= 1
    with pytest.raises(ValueError):
        w.step_grid(3)
    with pytest.raises(ValueError):
        w.step_grid(0)
    torch.testing.assert_close(w.step_grid(3, strict=False), torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=F64))
    # unequal windows: 1 + (N - K) * length each -> [3, 2, 2] steps for N = 7
    uneq = TimeWindows(boundaries=[0.0, 0.5, 0.75, 1.0]).step_grid(7)
    expected = torch.tensor([0, 1 / 6, 2 / 6, 0.5, 0.625, 0.75, 0.875, 1.0], dtype=F64)
    torch.testing.assert_close(uneq, expected)


def test_segment_point_and_velocity_by_hand():
    xs = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)
    ye = torch.tensor([[3.0, -2.0], [1.0, 1.0]], dtype=F64)
    t = torch.tensor([0.3, 1.0], dtype=F64)
    ts = torch.tensor([0.25, 0.5], dtype=F64)
    te = torch.tensor([0.5, 1.0], dtype=F64)
    torch.testing.assert_close(segment_point(xs, ye, t, ts, te), torch.tensor([[1.4, 1.2], [1.0, 1.0]], dtype=F64))
    torch.testing.assert_close(segment_velocity(xs, ye, ts, te), torch.tensor([[8.0, -16.0], [2.0, 2.0]], dtype=F64))


def _fine_solve(teacher, x, t0, t1):
    return odeint_adaptive(teacher, x, (t0, t1), rtol=1e-11, atol=1e-11)


def test_perflow_noised_data_batch(gmm2d):
    windows = TimeWindows(4)
    sampler = PeRFlowSampler(windows, gmm2d, teacher_steps=16, solver="rk4", start="noised_data")
    x1 = gmm2d.sample(200, 1.0, torch.Generator().manual_seed(0))
    wb = sampler(x1, torch.Generator().manual_seed(42))
    # re-derive the randomness with the same seed: t ~ U[0, 1) first, then eps ~ N(0, I)
    gen = torch.Generator().manual_seed(42)
    t = torch.rand(200, generator=gen, dtype=F64)
    eps = torch.randn(200, 2, generator=gen, dtype=F64)
    k = torch.floor(4 * t).long()
    torch.testing.assert_close(wb.t, t, rtol=0, atol=0)
    assert torch.equal(wb.k, k) and set(k.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(wb.t_start, (k / 4).to(F64), rtol=0, atol=0)
    torch.testing.assert_close(wb.t_end, ((k + 1) / 4).to(F64), rtol=0, atol=0)
    assert bool((wb.t >= wb.t_start).all() and (wb.t < wb.t_end).all())
    tk = (k / 4).to(F64)[:, None]
    torch.testing.assert_close(wb.x_start, (1 - tk) * eps + tk * x1, rtol=1e-14, atol=1e-14)
    for j in range(4):
        sel = k == j
        ref = _fine_solve(gmm2d, wb.x_start[sel], j / 4, (j + 1) / 4)
        torch.testing.assert_close(wb.y_end[sel], ref, rtol=1e-5, atol=1e-5)


def test_perflow_single_euler_step_by_hand(gmm2d):
    """M = 1 Euler: y_T = x_s + (t_{k+1} - t_k) v_T(x_s, t_k)."""
    sampler = PeRFlowSampler(TimeWindows(2), gmm2d, teacher_steps=1, solver="euler")
    x1 = gmm2d.sample(50, 1.0, torch.Generator().manual_seed(1))
    wb = sampler(x1, torch.Generator().manual_seed(2))
    expected = wb.x_start + 0.5 * gmm2d.velocity(wb.x_start, wb.t_start)
    torch.testing.assert_close(wb.y_end, expected, rtol=1e-14, atol=1e-14)


def test_perflow_teacher_ode_batch(gmm2d):
    """x_start = Phi_{0 -> t_k}(eps) and y_end = Phi_{t_k -> t_k+1}(x_start) on one teacher trajectory."""
    sampler = PeRFlowSampler(TimeWindows(4), gmm2d, teacher_steps=16, solver="rk4", start="teacher_ode")
    x1 = torch.zeros(120, 2, dtype=F64)  # the data batch only sizes the batch here
    wb = sampler(x1, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    t = torch.rand(120, generator=gen, dtype=F64)
    eps = torch.randn(120, 2, generator=gen, dtype=F64)
    k = torch.floor(4 * t).long()
    assert torch.equal(wb.k, k)
    for j in range(4):
        sel = k == j
        start = eps[sel] if j == 0 else _fine_solve(gmm2d, eps[sel], 0.0, j / 4)
        torch.testing.assert_close(wb.x_start[sel], start, rtol=1e-6, atol=1e-6)
        end = _fine_solve(gmm2d, eps[sel], 0.0, (j + 1) / 4)
        torch.testing.assert_close(wb.y_end[sel], end, rtol=1e-6, atol=1e-6)
    states = sampler.teacher_boundary_states(eps)
    assert states.shape == (5, 120, 2) and torch.equal(states[0], eps)


def test_perflow_sampler_validation(gmm2d):
    for bad in [dict(teacher_steps=0), dict(solver="dopri5"), dict(start="data")]:
        with pytest.raises(ValueError):
            PeRFlowSampler(TimeWindows(4), gmm2d, **bad)


def test_trajectory_matching_loss(gmm2d):
    sampler = PeRFlowSampler(TimeWindows(4), gmm2d, teacher_steps=2)
    x1 = gmm2d.sample(64, 1.0, torch.Generator().manual_seed(3))
    wb = sampler(x1, torch.Generator().manual_seed(4))
    frac = ((wb.t - wb.t_start) / (wb.t_end - wb.t_start))[:, None]
    point = wb.x_start + frac * (wb.y_end - wb.x_start)
    target = (wb.y_end - wb.x_start) / (wb.t_end - wb.t_start)[:, None]
    seen = {}

    def perfect(x, t):
        seen["x"], seen["t"] = x, t
        return target.clone()

    assert float(trajectory_matching_loss(perfect, wb)) == 0.0
    torch.testing.assert_close(seen["x"], point, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(seen["t"], wb.t, rtol=0, atol=0)
    zero = trajectory_matching_loss(lambda x, t: torch.zeros_like(x), wb)
    expected = sum(float(target[i, j]) ** 2 for i in range(64) for j in range(2)) / 128
    assert float(zero) == pytest.approx(expected, rel=1e-12)


def test_sample_few_step_euler_products():
    """v = c x: each Euler step multiplies by (1 + c h); N = 6 over 4 windows -> 2 steps of 1/8 in
    two windows and 1 step of 1/4 in the other two."""
    c = -1.3
    x0 = torch.tensor([[1.0, -2.0]], dtype=F64)
    out = sample_few_step(lambda x, t: c * x, x0, TimeWindows(4), 8)
    torch.testing.assert_close(out, x0 * (1 + c / 8) ** 8)
    out6 = sample_few_step(lambda x, t: c * x, x0, TimeWindows(4), 6)
    torch.testing.assert_close(out6, x0 * (1 + c / 8) ** 4 * (1 + c / 4) ** 2)
    out2 = sample_few_step(lambda x, t: c * x, x0, TimeWindows(4), 2)  # non-strict: uniform
    torch.testing.assert_close(out2, x0 * (1 + c / 2) ** 2)
    with pytest.raises(ValueError):
        sample_few_step(lambda x, t: c * x, x0, TimeWindows(4), 2, strict=True)
