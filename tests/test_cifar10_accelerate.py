"""The CIFAR-10 tier on the GPU tiers' shared accelerate loop, on CPU with tiny stand-ins: two
processes compute what one process computes, gradient accumulation, a kill and resume (bit for
bit, dropout included), the EMA (closed forms, Rectified Flow's warm-up on the real path, its device
after a resume), fp16 overflow skips on the shared path, the new keys' checks, and the per-sample
window batches against the core's sampler."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from params_helpers import with_value
from test_cifar10 import make_cifar, tiny_params

from marflow_core import PeRFlowSampler, TimeWindows
from marflow_core.errors import NonFiniteLossError
from marflow_core.integrity import verified_load
from replication import registry
from replication.config import ConfigError
from replication.gpu_common.ema import WeightEMA
from replication.stage import main

ROOT = Path(__file__).resolve().parents[1]
GPU_PARAMS = "replication/gpu/params.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Runs in this process build their own ``Accelerator`` (mixed precision differs): reset the
    shared state of accelerate around each test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar_data")
    make_cifar(root, per_batch=2)  # 10 training images
    return root


def params_for(tmp: Path, data: Path, teacher: dict | None = None, students: dict | None = None,
               dropout: float = 0.0, **student_section) -> Path:
    """A params file of the tiny tier writing under ``tmp``, with overrides of the training sections."""
    p = tiny_params(tmp)
    p["cifar10"]["data"]["root"] = str(data)
    p["cifar10"]["model"]["dropout"] = dropout
    p["cifar10_teacher"].update({"steps": 3, "batch_size": 4, "checkpoint_every": 10, **(teacher or {})})
    if students is not None:
        p["cifar10_students"]["students"] = students
        methods = {s["method"] for s in students.values()}
        if "reflow" not in methods:  # sections and keys without effect are refused
            del p["cifar10_pairs"]
        if "perflow" not in methods:
            del p["cifar10_students"]["perflow"]
        if not any(s.get("ma") for s in students.values()):
            del p["cifar10_students"]["ma"], p["cifar10_students"]["t_max"]
    p["cifar10_students"].update({"steps": 2, "batch_size": 4, "checkpoint_every": 10, **student_section})
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def final(tmp: Path, *parts: str) -> dict:
    return verified_load(tmp.joinpath("ckpt", *parts, "final.pt"))


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for _, v in sorted(state.items())])


def initial_teacher(path: Path) -> dict[str, torch.Tensor]:
    """The teacher's initial weights, drawn as the trainer draws them (global seed ``cifar10.seed``)."""
    from replication.cifar10.tier import make_model

    cfg = registry.section(yaml.safe_load(path.read_text()), "cifar10")
    torch.manual_seed(cfg.seed)
    return make_model(cfg.model).state_dict()


def run(stage: str, path: Path) -> None:
    assert main([stage, "--params", str(path), "--quiet"]) == 0


def launch_two(stage: str, path: Path) -> None:
    """``accelerate launch`` with two CPU processes (gloo) of ``python -m replication.stage``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + (os.getpid() + len(stage)) % 1000),
           "-m", "replication.stage", stage, "--params", str(path), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def relative_gap(a: dict, b: dict, start: dict) -> float:
    """``|a - b| / |a - start|``: the two runs' difference against how far training moved."""
    return float((flat(a) - flat(b)).norm() / (flat(a) - flat(start)).norm())


# ----------------------------------------------------------------------------- EMA closed forms
def test_ema_closed_forms():
    """With weights ``a`` at construction and ``c`` at every update, ``ema_n = c + (a - c) prod d_j``:
    ``d^n`` at constant decay; with Rectified Flow's warm-up ``d_j = (1 + j) / (10 + j)`` the product
    telescopes to ``10! (n + 1)! / (n + 10)!``; once the cap binds it continues as ``decay^j``. A
    linear ramp ``theta_k = k`` lags by ``d / (1 - d) (1 - d^n)``."""
    a, c = 3.0, -1.0

    def averaged(decay: float, warmup: bool, n: int, values=None) -> float:
        p = torch.nn.Parameter(torch.tensor([a], dtype=torch.float64))
        ema = WeightEMA([p], decay, warmup=warmup)
        for k in range(1, n + 1):
            p.data.fill_(c if values is None else values(k))
            ema.step([p])
        assert ema.num_updates == n
        return float(ema.shadow_params[0])

    for n in (1, 2, 7, 40):
        assert averaged(0.9, False, n) == pytest.approx(c + (a - c) * 0.9**n, rel=1e-12)
        telescoped = math.factorial(10) * math.factorial(n + 1) / math.factorial(n + 10)
        assert averaged(0.999, True, n) == pytest.approx(c + (a - c) * telescoped, rel=1e-12)
    # decay 0.5: (1 + j) / (10 + j) <= 0.5 up to j = 8, the cap from j = 9 on
    warm = math.factorial(10) * math.factorial(9) / math.factorial(18)
    assert averaged(0.5, True, 12) == pytest.approx(c + (a - c) * warm * 0.5**4, rel=1e-12)
    d, n = 0.8, 15
    ramp = averaged(d, False, n, values=float)
    assert ramp == pytest.approx(n - d / (1 - d) * (1 - d**n) + a * d**n, rel=1e-12)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA([torch.nn.Parameter(torch.zeros(1))], 1.0)


def test_ema_state_keeps_its_device_and_dtype_and_refuses_another_model():
    """accelerate hands a registered object's state back on the CPU: the EMA's averages stay where
    they were (here the ``meta`` device and float64 stand in for a GPU)."""
    p = torch.nn.Parameter(torch.arange(4.0))
    saved = WeightEMA([p], 0.9)
    saved.step([torch.nn.Parameter(torch.ones(4))])
    on_meta = WeightEMA([torch.nn.Parameter(torch.zeros(4, device="meta"))], 0.9)
    on_meta.load_state_dict(saved.state_dict())
    assert on_meta.shadow_params[0].device.type == "meta" and on_meta.num_updates == 1
    wide = WeightEMA([torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))], 0.9)
    wide.load_state_dict(saved.state_dict())
    assert wide.shadow_params[0].dtype == torch.float64
    assert torch.equal(wide.shadow_params[0], saved.shadow_params[0].double())
    with pytest.raises(ValueError, match="does not fit"):
        WeightEMA([torch.nn.Parameter(torch.zeros(5))], 0.9).load_state_dict(saved.state_dict())


# --------------------------------------------------------------------- the EMA on the real path
def test_the_saved_ema_is_rectified_flows_average_of_the_checkpointed_weights(tmp_path, data_root):
    """``final.pt``'s ``model`` is ``d_2 (d_1 theta_0 + (1 - d_1) theta_1) + (1 - d_2) theta_2`` with
    ``d_n = (1 + n) / (10 + n)``, from the initial weights, the step-1 checkpoint and the trained
    weights; the stages downstream read it; the students start from the *trained* teacher weights
    (their first EMA update gives them back: ``theta_0 = (ema_1 - 9/11 theta_1) 11/2``)."""
    from safetensors.torch import load_file

    from replication.cifar10.tier import load_teacher, teacher_trained_weights

    path = params_for(tmp_path, data_root, teacher={"steps": 2, "checkpoint_every": 1,
                                                    "checkpoints_total_limit": None},
                      students={"r": {"method": "reflow", "windows": 1, "ma": False, "seeds": [0]}},
                      steps=1, checkpoint_every=1, checkpoints_total_limit=None)
    run("cifar10_teacher", path)
    saved = final(tmp_path, "teacher")
    theta0 = initial_teacher(path)
    theta1 = load_file(tmp_path / "ckpt" / "teacher" / "checkpoints" / "checkpoint-1" / "model.safetensors")
    theta2 = saved["trained"]
    d1, d2 = 2 / 11, 3 / 12
    for key in theta2:
        expected = d2 * (d1 * theta0[key] + (1 - d1) * theta1[key]) + (1 - d2) * theta2[key]
        torch.testing.assert_close(saved["model"][key], expected, rtol=1e-5, atol=1e-6)
    assert saved["ema_updates"] == 2 and relative_gap(saved["model"], saved["trained"], theta0) > 0.1

    cfg = registry.section(yaml.safe_load(path.read_text()), "cifar10")
    teacher, _ = load_teacher(cfg)
    assert all(torch.equal(v, saved["model"][k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, saved["trained"][k]) for k, v in teacher_trained_weights(cfg).items())

    run("cifar10_pairs", path)
    run("cifar10_students", path)
    student = final(tmp_path, "students", "r", "seed0")
    theta1 = load_file(tmp_path / "ckpt" / "students" / "r" / "seed0" / "checkpoints" / "checkpoint-1"
                       / "model.safetensors")
    start = {k: (student["model"][k] - 9 / 11 * theta1[k]) * 11 / 2 for k in theta1}
    assert relative_gap(start, saved["trained"], saved["model"]) < 1e-4


def test_ema_decay_zero_keeps_no_average_and_a_new_decay_retrains(tmp_path, data_root):
    path = params_for(tmp_path, data_root, teacher={"steps": 2, "ema_decay": 0.0})
    run("cifar10_teacher", path)
    saved = final(tmp_path, "teacher")
    assert saved["ema_updates"] == 0
    assert all(torch.equal(saved["model"][k], v) for k, v in saved["trained"].items())
    run("cifar10_teacher", params_for(tmp_path, data_root, teacher={"steps": 2, "ema_decay": 0.5}))
    again = final(tmp_path, "teacher")  # the run started over with the new decay (not "finished")
    assert again["ema_updates"] == 2 and not torch.equal(flat(again["model"]), flat(again["trained"]))


def test_the_batch_plan_splits_each_global_batch_and_moves_on():
    """Step ``s`` reads global positions ``[s G, (s + 1) G)`` exactly once over processes and
    micro-steps; one epoch reads every item once."""
    from replication.gpu_common.batches import BatchPlan

    plan = BatchPlan(n_items=12, batch_size=2, processes=3, grad_accum=2, seed=0, tag="cifar10")
    for step in (0, 1, 5):
        got = sorted(p for m in range(2) for r in range(3) for p in plan.positions(step, m, r))
        assert got == list(range(12 * step, 12 * (step + 1)))
    assert sorted(plan.items(list(range(12, 24))).tolist()) == list(range(12))
    assert plan.items(list(range(12))).tolist() != plan.items(list(range(12, 24))).tolist()  # a new order


# ------------------------------------------------------------------- processes and accumulation
@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_root) -> Path:
    """The teacher (3 steps, global batch 4) and a reflow + MA and a PeRFlow + MA student (2 steps),
    one process, no dropout."""
    from accelerate.state import AcceleratorState

    tmp = tmp_path_factory.mktemp("one")
    students = {"reflow_ma": {"method": "reflow", "windows": 1, "ma": True, "ma_weight": None, "ma_substeps": None, "seeds": [0]},
                "perflow2_ma": {"method": "perflow", "windows": 2, "ma": True, "ma_weight": None, "ma_substeps": None, "seeds": [0]}}
    path = params_for(tmp, data_root, students=students)
    for stage in ("cifar10_teacher", "cifar10_pairs", "cifar10_students"):
        AcceleratorState._reset_state(reset_partial_state=True)
        run(stage, path)
    return tmp


def test_two_processes_match_one_process(one_process, tmp_path):
    """``accelerate launch`` with 2 CPU processes x 2 samples == 1 process x 4 samples: the same
    loss, and weights that differ by under 1e-3 of how far training moved them (float32 sums in
    another order; Adam turns the rounding of gradients that are zero in exact arithmetic, such as
    the attention key biases', into updates of up to ``lr``)."""
    path = tmp_path / "params.yaml"
    path.write_text((one_process / "params.yaml").read_text().replace(str(one_process), str(tmp_path)))
    launch_two("cifar10_teacher", path)
    one, two = final(one_process, "teacher"), final(tmp_path, "teacher")
    start = initial_teacher(path)
    for key in ("trained", "model"):
        assert relative_gap(one[key], two[key], start) < 1e-3
    assert [r["step"] for r in two["history"]] == [1, 2, 3]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["fm"] == pytest.approx(b["fm"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_two_processes_match_one_process_for_ma_students(one_process, tmp_path):
    """The students (pair bank and window solve, MA with finite differences through DDP) over 2
    processes, from the same teacher and bank: within 1e-2 of the update (measured about 1e-3: the
    finite differences divide float32 rounding by ``fd_step``)."""
    path = tmp_path / "params.yaml"
    path.write_text((one_process / "params.yaml").read_text().replace(str(one_process), str(tmp_path)))
    for part in ("teacher", "pairs"):
        shutil.copytree(one_process / "ckpt" / part, tmp_path / "ckpt" / part)
    launch_two("cifar10_students", path)
    start = final(one_process, "teacher")["trained"]
    for name in ("reflow_ma", "perflow2_ma"):
        one, two = final(one_process, "students", name, "seed0"), final(tmp_path, "students", name, "seed0")
        for key in ("trained", "model"):
            assert relative_gap(one[key], two[key], start) < 1e-2
        for a, b in zip(one["history"], two["history"], strict=True):
            assert a["tm"] == pytest.approx(b["tm"], rel=1e-5) and a["ma"] == pytest.approx(b["ma"], rel=1e-4)


def test_gradient_accumulation_is_the_full_batch(one_process, tmp_path, data_root):
    """``grad_accum: 2`` (two micro-batches of 2) == one batch of 4."""
    path = params_for(tmp_path, data_root, teacher={"grad_accum": 2})
    run("cifar10_teacher", path)
    one, accumulated = final(one_process, "teacher"), final(tmp_path, "teacher")
    start = initial_teacher(path)
    assert relative_gap(one["trained"], accumulated["trained"], start) < 1e-3
    assert one["history"][-1]["fm"] != accumulated["history"][-1]["fm"]  # the last micro-batch's loss
    other = params_for(tmp_path / "half", data_root, teacher={"batch_size": 2})  # another computation
    run("cifar10_teacher", other)
    assert relative_gap(one["trained"], final(tmp_path / "half", "teacher")["trained"], start) > 0.1


# ------------------------------------------------------------------------------------- resume
def test_a_killed_run_resumes_at_its_checkpoint_bit_for_bit(tmp_path, data_root, monkeypatch, capsys):
    """A run killed in step 4 of 4 (checkpoints at 2) resumes at step 2 and ends with the weights,
    EMA and log of an uninterrupted run, dropout included (accelerate restores the RNG states); the
    log row written after the checkpoint is not repeated; the EMA is on the model's device at its
    first update after the resume; ``checkpoints_total_limit: 1`` keeps the newest checkpoint."""
    from replication.cifar10 import objective

    teacher = {"steps": 4, "checkpoint_every": 2, "checkpoints_total_limit": 1}
    whole = params_for(tmp_path / "whole", data_root, teacher=teacher, dropout=0.1)
    run("cifar10_teacher", whole)

    path = params_for(tmp_path / "killed", data_root, teacher=teacher, dropout=0.1)
    original = objective.CifarLoss.__call__

    def killed_at_step_3(self, model, wb, step, probes):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, model, wb, step, probes)

    with monkeypatch.context() as mp:
        mp.setattr(objective.CifarLoss, "__call__", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            main(["cifar10_teacher", "--params", str(path), "--quiet"])
    run_dir = tmp_path / "killed" / "ckpt" / "teacher"
    assert [json.loads(x)["step"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run_dir / "final.pt").exists()

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    seen: list[tuple] = []
    original_step = WeightEMA.step

    def recording_step(self, parameters):
        parameters = list(parameters)
        seen.append((self.num_updates, {s.device for s in self.shadow_params}, {p.device for p in parameters}))
        return original_step(self, parameters)

    capsys.readouterr()
    with monkeypatch.context() as mp:
        mp.setattr(WeightEMA, "step", recording_step)
        run("cifar10_teacher", path)
    assert "at step 2" in capsys.readouterr().out
    assert [n for n, _, _ in seen] == [2, 3]  # two steps left, the EMA resumed with its count
    assert all(shadow == params for _, shadow, params in seen)
    a, b = final(tmp_path / "whole", "teacher"), final(tmp_path / "killed", "teacher")
    for key in ("trained", "model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("sec_per_step", "peak_memory_mb")} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"]) and [r["step"] for r in b["history"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4"]
    # a finished run is not trained again, even with its checkpoints deleted (to free the disk)
    shutil.rmtree(run_dir / "checkpoints")
    before = (run_dir / "final.pt").read_bytes()
    AcceleratorState._reset_state(reset_partial_state=True)
    run("cifar10_teacher", path)
    assert (run_dir / "final.pt").read_bytes() == before and not (run_dir / "checkpoints").exists()


# ------------------------------------------------------------------------------- fp16 overflow
def _overflowing(monkeypatch, overflow_calls: set[int], scales: list[float]) -> None:
    """``accelerate.Accelerator`` with a CPU GradScaler under fp16 whose gradient gets an inf entry at
    the given backward calls (the scale before each optimizer step goes to ``scales``)."""
    import accelerate
    from accelerate.accelerator import Accelerator

    class Overflowing(Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
                self.native_amp = True
            self.calls = 0

        def backward(self, loss, **kwargs) -> None:
            super().backward(loss, **kwargs)
            if self.calls in overflow_calls:
                next(p for p in self._models[0].parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
            self.calls += 1
            scales.append(float(self.scaler.get_scale()))

    monkeypatch.setattr(accelerate, "Accelerator", Overflowing)


def test_fp16_overflow_skips_the_step_and_the_ema_update(tmp_path, data_root, monkeypatch):
    """Under fp16 an overflowed gradient is skipped (no weight update, no EMA update, the scale
    halves, the log says so); ``max_overflow_skips`` consecutive skips stop the run naming the step."""
    scales: list[float] = []
    _overflowing(monkeypatch, {0}, scales)
    fp16 = {"mixed_precision": "fp16", "max_overflow_skips": 2}
    path = params_for(tmp_path / "one", data_root, teacher={**fp16, "steps": 3})
    run("cifar10_teacher", path)
    saved = final(tmp_path / "one", "teacher")
    log = saved["history"]
    assert log[0]["grad_norm"] is None and [r["overflow_skips"] for r in log] == [1, 1, 1]
    assert all(r["grad_norm"] > 0 for r in log[1:])
    assert scales[:2] == [2.0**10, 2.0**9] and saved["ema_updates"] == 2

    _overflowing(monkeypatch, {0, 1}, [])
    with pytest.raises(NonFiniteLossError, match=r"step 1: 2 consecutive fp16 overflow skips"):
        main(["cifar10_teacher", "--params", str(params_for(tmp_path / "two", data_root,
                                                            teacher={**fp16, "steps": 3})), "--quiet"])


# -------------------------------------------------------------------------------------- keys
def test_the_new_keys_are_checked_naming_them(tmp_path, data_root, capsys):
    base = tiny_params(tmp_path)
    registry.validate_all(base, GPU_PARAMS)
    cases = [
        (("cifar10_teacher", "grad_accum"), 0, "cifar10_teacher.grad_accum = 0: must be >= 1"),
        (("cifar10_students", "mixed_precision"), "fp32", "cifar10_students.mixed_precision = 'fp32': one of"),
        (("cifar10_teacher", "ema_decay"), 1.0, "cifar10_teacher.ema_decay = 1.0: must lie in [0, 1)"),
        (("cifar10_students", "checkpoints_total_limit"), 0, "cifar10_students.checkpoints_total_limit = 0"),
        (("cifar10_teacher", "max_overflow_skips"), 5, "cifar10_teacher.max_overflow_skips = 5: has no effect"),
        (("cifar10_students", "snapshot_every"), 0, "cifar10_students.snapshot_every = 0: has no effect"),
        (("cifar10_students", "ma", "batch_fraction"), 0.5, "cifar10_students.ma.batch_fraction = 0.5: must be 1"),
    ]
    for keys, value, message in cases:
        with pytest.raises(ConfigError) as err:
            registry.validate_all(with_value(base, keys, value), GPU_PARAMS)
        assert message in str(err.value), str(err.value)
    fp16 = with_value(base, ("cifar10_teacher", "mixed_precision"), "fp16")
    registry.validate_all(with_value(fp16, ("cifar10_teacher", "max_overflow_skips"), 5), GPU_PARAMS)

    path = params_for(tmp_path, data_root, teacher={"grad_accum": 3})
    assert main(["cifar10_teacher", "--params", str(path), "--quiet"]) == 2
    assert ("cifar10_teacher.batch_size = 4: the global batch must split evenly over 1 process(es) x "
            "grad_accum 3") in capsys.readouterr().err
    assert not (tmp_path / "ckpt" / "teacher").exists()


def test_the_gpu_params_carry_rectified_flows_ema_decays():
    params = yaml.safe_load((ROOT / GPU_PARAMS).read_text())
    assert params["cifar10_teacher"]["ema_decay"] == 0.999999  # cifar10_rf_gaussian_ddpmpp.py
    assert params["cifar10_students"]["ema_decay"] == 0.9999  # cifar10_rf_gaussian_reflow_train.py
    assert params["cifar10_teacher"]["mixed_precision"] == "no"


# --------------------------------------------------------------------------- window batches
@pytest.mark.parametrize("start", ["noised_data", "teacher_ode"])
def test_the_per_sample_window_batch_is_the_core_samplers(start):
    """Given the draws ``PeRFlowSampler`` makes from its generator (times, then noise), the tier's
    window batch is the core sampler's."""
    from replication.cifar10.objective import perflow_batch

    sampler = PeRFlowSampler(TimeWindows(3), lambda x, t: -0.5 * x + t[:, None, None, None], teacher_steps=2,
                             solver="euler", start=start)
    x1 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(7)
    u = torch.rand(5, generator=draws)
    noise = torch.randn(x1.shape, generator=draws)
    ours = perflow_batch(sampler, x1, u, noise)
    core = sampler(x1, torch.Generator().manual_seed(7))
    for name in ("x_start", "y_end", "k", "t", "t_start", "t_end"):
        torch.testing.assert_close(getattr(ours, name), getattr(core, name), rtol=0, atol=0)
    assert len(set(core.k.tolist())) > 1


def test_the_teachers_loss_is_flow_matching():
    """``L_TM`` of the straight window is ``mean (v(x_t, t) - (x1 - x0))^2``, ``x_t = (1 - t) x0 + t x1``."""
    from replication.cifar10.objective import CifarLoss, straight_batch

    g = torch.Generator().manual_seed(0)
    x0, x1, u = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g), torch.rand(4, generator=g)
    model = lambda x, t: 0.3 * x + t[:, None, None, None]  # noqa: E731
    loss, parts = CifarLoss(tm_name="fm")(model, straight_batch(x0, x1, u), 0, None)
    tt = u[:, None, None, None]
    expected = (0.3 * ((1 - tt) * x0 + tt * x1) + tt - (x1 - x0)).pow(2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and set(parts) == {"fm", "total"}


def test_ma_finite_differences_run_in_float32_with_tf32_off_under_bf16():
    """A PeRFlow + MA student's loss under accelerate's bf16 autocast: the trajectory-matching pass
    runs in bf16, the finite-difference MA passes in float32 with autocast and TF32 off (whose 10-bit
    mantissa would swamp ``fd_step``), and TF32 is back on after."""
    from accelerate import Accelerator

    from replication.cifar10 import tier
    from replication.gpu_common.batches import BatchPlan

    params = tiny_params(Path("unused"))
    cfg = registry.section(params, "cifar10")
    students = registry.section(params, "cifar10_students")
    torch.manual_seed(0)
    teacher = tier.make_model(cfg.model).eval().requires_grad_(False)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(tier.make_model(students.student_unet(cfg.model)))
    calls: list[dict] = []

    def record(module, args, output):
        calls.append({"dtype": output.dtype, "autocast": torch.is_autocast_enabled("cpu"),
                      "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)})

    accelerator.unwrap_model(model).unet.conv_out.register_forward_hook(record)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    build = tier.student_losses(cfg, students, students.students["perflow2_ma"], teacher, images, None)
    micro_loss = build(accelerator, model, BatchPlan(10, 2, 1, 1, 0, "cifar10"))
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        loss, parts = micro_loss(0, 0)
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    tm_pass, ma_passes = calls[0], calls[1:]
    assert tm_pass["dtype"] == torch.bfloat16 and tm_pass["autocast"] and tm_pass["tf32"] == (True, True)
    assert ma_passes and all(c["dtype"] == torch.float32 and not c["autocast"] and c["tf32"] == (False, False)
                             for c in ma_passes)
    assert after == (True, True) and set(parts) == {"tm", "ma", "total"} and loss.requires_grad
