"""PeRFlowScheduler (docs/method.md, section 7): timesteps, steps, published config, pipelines.

The acceptance test: a synthetic student that outputs exactly the trainer's targets for the teacher's
trajectory makes the scheduler land on the teacher's window end points. With N > K steps it also
checks that every intermediate sample lies on the straight segment of its window (the student is
piecewise straight in x, and the eps parametrisation predicts the same window end from every point
of the segment), which is what "reproducing the teacher" means between the window boundaries.
"""

import json

import numpy as np
import pytest
import torch

from marflow_core.errors import InvalidParameter
from replication.sd15.scheduler import PeRFlowScheduler
from replication.sd15.vp import sd15_alphas_cumprod, student_target, teacher_window_solve

F64 = torch.float64
T = 1000
NP_TABLE = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2)

PUBLISHED_CONFIG = {  # the keys of the published PeRFlow SD 1.5 scheduler_config.json
    "_class_name": "PeRFlowScheduler",
    "_diffusers_version": "0.25.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_time_windows": 4,
    "num_train_timesteps": 1000,
    "prediction_type": "diff_eps",
    "set_alpha_to_one": False,
    "t_clean": 0,
    "t_noise": 1,
    "trained_betas": None,
}


def hand_lambda_eta(k: int, K: int, kind: str) -> tuple[float, float]:
    """Window k's coefficients from the numpy table (index tau - 1, clamped at 0)."""
    a_s = NP_TABLE[(K - k) * T // K - 1]
    a_e = NP_TABLE[max((K - k - 1) * T // K - 1, 0)]
    lam = np.sqrt(a_e / a_s)
    if kind == "ddim_eps":
        return lam, np.sqrt(1 - a_e) - np.sqrt(a_e * (1 - a_s) / a_s)
    return lam, -np.sqrt((a_e - a_s) / a_s)


@pytest.mark.parametrize(("K", "N", "expected"), [
    (4, 4, [1000, 750, 500, 250]),
    (4, 6, [1000, 875, 750, 625, 500, 250]),
    (4, 12, [1000, 916, 833, 750, 666, 583, 500, 416, 333, 250, 166, 83]),
    (2, 3, [1000, 750, 500]),
    (1, 2, [1000, 500]),
])
def test_timesteps_spread_over_windows(K, N, expected):
    s = PeRFlowScheduler(num_time_windows=K)
    s.set_timesteps(N)
    assert s.timesteps.tolist() == expected and s.timesteps.dtype == torch.int64


def teacher_eps(x, index):
    """A smooth, nonlinear, time-dependent synthetic teacher."""
    w = (index / T).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.3 * w * torch.sin(2 * x) + 0.1


class OracleStudent:
    """Outputs the trainer's target of the window that holds tau, after checking that the scheduler
    kept the sample on that window's straight segment of the teacher trajectory."""

    def __init__(self, ends: list[torch.Tensor], K: int, kind: str, table: torch.Tensor) -> None:
        self.ends, self.K, self.kind, self.table = ends, K, kind, table
        self.max_off_segment = 0.0

    def __call__(self, x: torch.Tensor, tau: int) -> torch.Tensor:
        k = (T - tau) * self.K // T  # integer arithmetic: tau_s >= tau > tau_e
        tau_s, tau_e = (self.K - k) * T // self.K, (self.K - k - 1) * T // self.K
        x_s, y_e = self.ends[k], self.ends[k + 1]
        r = (tau_s - tau) / (tau_s - tau_e)
        self.max_off_segment = max(self.max_off_segment, float((x - (x_s + r * (y_e - x_s))).abs().max()))
        if self.kind == "velocity":
            hand = (y_e - x_s) / ((tau_e - tau_s) / T)  # PeRFlow's velocity: d x / d(tau / T)
        else:
            lam, eta = hand_lambda_eta(k, self.K, self.kind)
            hand = (y_e - lam * x_s) / eta
        kb = torch.full((x.shape[0],), k)
        assert torch.allclose(student_target(x_s, y_e, kb, self.table, self.K, self.kind), hand)
        return hand


@pytest.mark.parametrize("kind", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize(("K", "N"), [(2, 2), (2, 3), (2, 5), (4, 4), (4, 7), (4, 12)])
def test_oracle_student_reproduces_teacher_window_ends(kind, K, N):
    table = sd15_alphas_cumprod()
    g = torch.Generator().manual_seed(K * 100 + N)
    x_T = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    ends = [x_T]
    for k in range(K):
        ends.append(teacher_window_solve(teacher_eps, ends[-1], torch.full((3,), k), table, K, 3))
    student = OracleStudent(ends, K, kind, table)
    sched = PeRFlowScheduler(prediction_type=kind, num_time_windows=K)
    sched.set_timesteps(N)
    x, reached = x_T, []
    for i, tau in enumerate(sched.timesteps.tolist()):
        x = sched.step(student(x, tau), sched.timesteps[i], x).prev_sample
        nxt = sched.timesteps[i + 1].item() if i + 1 < N else 0
        if nxt % (T // K) == 0:
            reached.append(x)
    assert len(reached) == K
    for k in range(K):
        torch.testing.assert_close(reached[k], ends[k + 1], rtol=1e-9, atol=1e-9)
    assert student.max_off_segment < 1e-9


@pytest.mark.parametrize("kind", ["diff_eps", "ddim_eps"])
def test_n_equals_k_step_is_the_window_jump_by_hand(kind):
    sched = PeRFlowScheduler(prediction_type=kind)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(7)
    x, eps = torch.randn(2, 3, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    for k, tau in enumerate(sched.timesteps):
        lam, eta = hand_lambda_eta(k, 4, kind)
        out = sched.step(eps, tau, x)
        torch.testing.assert_close(out.prev_sample, lam * x + eta * eps)
        torch.testing.assert_close(out.pred_window_end, lam * x + eta * eps)


def test_float32_step_and_add_noise():
    sched = PeRFlowScheduler()
    sched.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    out = sched.step(torch.randn_like(x), sched.timesteps[0], x).prev_sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    z, n = torch.ones(2, 3), torch.full((2, 3), 2.0)
    noisy = sched.add_noise(z, n, torch.tensor([1000, 1]))
    a = NP_TABLE[[999, 0]][:, None]
    np.testing.assert_allclose(noisy.numpy(), np.broadcast_to(np.sqrt(a) + 2 * np.sqrt(1 - a), (2, 3)), rtol=1e-6)
    assert sched.init_noise_sigma == 1.0 and sched.order == 1 and len(sched) == T
    assert torch.equal(sched.scale_model_input(x, sched.timesteps[0]), x)


def test_published_config_loads_and_round_trips(tmp_path):
    folder = tmp_path / "perflow" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    loaded = PeRFlowScheduler.from_pretrained(tmp_path / "perflow", subfolder="scheduler")
    direct = PeRFlowScheduler.from_config(PUBLISHED_CONFIG)
    assert loaded.config.prediction_type == "diff_eps" and loaded.config.num_time_windows == 4
    loaded.save_pretrained(tmp_path / "again")
    again = PeRFlowScheduler.from_pretrained(tmp_path / "again")
    keys = [k for k in PUBLISHED_CONFIG if not k.startswith("_")]
    assert {k: again.config[k] for k in keys} == {k: PUBLISHED_CONFIG[k] for k in keys}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    paths = []
    for s in (loaded, direct, again):
        s.set_timesteps(8)
        x = x0
        for tau in s.timesteps:
            x = s.step(0.5 * torch.tanh(x) + tau / T, tau, x).prev_sample
        paths.append(x)
    assert torch.equal(paths[0], paths[1]) and torch.equal(paths[0], paths[2])


def test_unsupported_settings_are_named():
    with pytest.raises(InvalidParameter, match="prediction_type='epsilon'.*diff_eps.*ddim_eps.*velocity"):
        PeRFlowScheduler(prediction_type="epsilon")
    with pytest.raises(InvalidParameter, match="v_prediction"):
        PeRFlowScheduler.from_config({**PUBLISHED_CONFIG, "prediction_type": "v_prediction"})
    with pytest.raises(InvalidParameter, match="num_inference_steps=2.*num_time_windows=4"):
        PeRFlowScheduler().set_timesteps(2)
    with pytest.raises(InvalidParameter, match="t_noise"):
        PeRFlowScheduler(t_clean=0.1)
    with pytest.raises(InvalidParameter, match="num_time_windows=3"):
        PeRFlowScheduler(num_time_windows=3)
    s = PeRFlowScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 600"):
        s.step(torch.zeros(1, 2), 600, torch.zeros(1, 2))


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@pytest.mark.parametrize("kind", ["diff_eps", "velocity"])
def test_scheduler_in_a_diffusers_pipeline_and_a_hand_loop(kind):
    """DDPMPipeline (calls step with a generator) equals a hand-written denoising loop; with
    N = K = 2 the hand loop is two window jumps computed from the numpy table."""
    from diffusers import DDPMPipeline

    unet, sched = tiny_unet(), PeRFlowScheduler(prediction_type=kind, num_time_windows=2)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=2,
               output_type="np").images
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for k, tau in enumerate((1000, 500)):
            pred = unet(x, torch.tensor(tau)).sample
            if kind == "velocity":
                x = x + (-500 / T) * pred
            else:
                lam, eta = hand_lambda_eta(k, 2, kind)
                x = lam * x + eta * pred
    np.testing.assert_allclose(out, (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)
