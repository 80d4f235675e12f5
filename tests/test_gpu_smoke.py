"""The GPU smoke run (``python -m replication.sd15.gpu_smoke``) on CPU: its SD 1.5 configs, its plan,
out-of-memory handling, the timing read from the real trainer, the finite-difference-vs-VJP
comparison against closed forms, the kill mechanics, the JSON schema, the cost table of
docs/gpu.md, and (slow) the whole command at tiny size."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml

from replication.config import ConfigError, load_params
from replication.sd15.gpu_smoke import cost_table
from replication.sd15.gpu_smoke.plan import PROFILE, load_plan
from replication.sd15.gpu_smoke.report import (
    Components,
    DivergenceCase,
    Environment,
    GenerationCase,
    ResumeCheck,
    SmokeReport,
    TrainCase,
    read_report,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
GPU_PARAMS = ROOT / "replication" / "gpu" / "params.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _recipe() -> dict:
    from replication.sd15.gpu_smoke.run import load_recipe

    return load_recipe(GPU_PARAMS)


# --------------------------------------------------------------------------- SD 1.5 configs, plan
def test_the_sd15_configs_build_the_published_architecture():
    """CompVis/stable-diffusion README: "an 860M UNet and CLIP ViT-L/14 text encoder" (123M), a
    downsampling-factor 8 autoencoder with 4 latent channels; the UNet attends to the 768-wide text."""
    from replication.sd15.gpu_smoke.build import n_params, sd15_config, sd15_modules

    with torch.device("meta"):
        unet, vae, text = sd15_modules()
    assert round(n_params(unet) / 1e6) == 860 and round(n_params(text) / 1e6) == 123
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    assert unet.config.cross_attention_dim == text.config.hidden_size == 768
    assert unet.config.in_channels == vae.config.latent_channels and vae.config.scaling_factor == 0.18215
    assert text.config.vocab_size == 49408 and text.config.max_position_embeddings == 77
    sched = sd15_config("scheduler")
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")


def test_both_plans_and_every_case_config_validate():
    from replication.sd15.gpu_smoke.run import check_plan

    recipe = _recipe()
    for size in ("tiny", "full"):
        check_plan(load_plan(size), recipe)  # raises ConfigError naming the case and key otherwise
    full = load_plan("full")
    assert full.components == "sd15" and full.captions.size == 512 and full.gradient_checkpointing
    assert {(c.ma, c.mixed_precision, c.ma_fd_fp32) for c in full.cases.values()} >= {
        (False, "fp16", None), (False, "bf16", None), (True, "fp16", True), (True, "fp16", False), (True, "bf16", True)}
    assert len({b for c in full.cases.values() for b in c.batch_sizes}) >= 3


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda p: p["full"]["cases"]["perflow_fp16"].update(batch_sizes=[8, 8]), "gpu_smoke.full.cases.perflow_fp16.batch_sizes"),
    (lambda p: p["full"]["cases"]["perflow_ma_fp16"].update(ma_fd_fp32=None), "gpu_smoke.full.cases.perflow_ma_fp16.ma_fd_fp32"),
    (lambda p: p["tiny"]["divergence"].update(precisions=["fp8"]), "gpu_smoke.tiny.divergence.precisions"),
    (lambda p: p["full"]["resume"]["overrides"].update(steps=3), "gpu_smoke.full.resume.overrides.steps"),
    (lambda p: p["full"].pop("timed_steps"), "gpu_smoke.full.timed_steps: required key is missing"),
    (lambda p: p["full"].update(warmup=1), "gpu_smoke.full.warmup"),
])
def test_a_bad_plan_key_is_refused_by_name(tmp_path, edit, needle):
    data = load_params(PROFILE, overlay=False)
    edit(data["gpu_smoke"])
    path = tmp_path / "gpu_smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_plan("full", path)
        load_plan("tiny", path)


def test_a_case_changes_only_its_own_keys_of_the_recipe():
    from replication.sd15.gpu_smoke.training import Inputs, case_section

    params = load_params(GPU_PARAMS)
    plan = load_plan("full")
    inputs = Inputs(Path("m"), Path("d"), Path("w"))
    section = case_section(_recipe(), plan, True, "bf16", 8, False, Path("o"), inputs, 3)
    own = {"model_dir": "m", "data_dir": "d", "output_dir": "o", "steps": 3, "batch_size": 8, "grad_accum": 1,
           "mixed_precision": "bf16", "gradient_checkpointing": True, "log_every": 1, "debug_dump": None,
           "ma_fd_fp32": False}
    assert {k: section[k] for k in own} == own
    rest = {k: v for k, v in params["sd15_train"].items() if k not in own and k != "max_overflow_skips"}
    assert {k: section[k] for k in rest} == rest  # the recipe as written (teacher steps, MA, lr, EMA ...)
    assert "max_overflow_skips" not in section     # only fp16 has a GradScaler
    perflow = case_section(_recipe(), plan, False, "fp16", 1, None, Path("o"), inputs, 3)
    assert "ma" not in perflow and "ma_fd_fp32" not in perflow and perflow["max_overflow_skips"] == 20


def test_cases_run_by_ascending_batch_then_in_plan_order():
    from replication.sd15.gpu_smoke.training import schedule

    plan = load_plan("full")
    order = [(name, b) for name, _, b in schedule(plan)]
    assert [b for _, b in order] == sorted(b for _, b in order)
    assert order[:2] == [("perflow_fp16", 1), ("perflow_ma_fp16", 1)]
    assert len(order) == sum(len(c.batch_sizes) for c in plan.cases.values())


# ------------------------------------------------------------------------------- OOM, timing
@pytest.mark.parametrize(("err", "oom"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes."), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("mat1 and mat2 must have the same dtype"), False),
    (ValueError("out of memory"), False),
])
def test_allocation_failures_are_told_apart(err, oom):
    from replication.sd15.gpu_smoke.device import is_oom

    assert is_oom(err) is oom


def _fake_plan(cases: dict, warmup: int = 2, timed: int = 3, budget: float = 1e9):
    import dataclasses

    from replication.sd15.gpu_smoke.plan import TrainCasePlan

    plan = load_plan("tiny")
    return dataclasses.replace(plan, cases={k: TrainCasePlan(**v) for k, v in cases.items()}, warmup_steps=warmup,
                               timed_steps=timed, train_budget_s=budget)


def _fake_train(fail: dict, calls: list):
    """A stand-in for ``train.train``: raises ``fail[(precision, batch)]`` if given, else writes the
    trainer's log with ``sec_per_step = batch + step / 10``."""

    def train(cfg, progress, save):
        calls.append((cfg.mixed_precision, cfg.batch_size, cfg.student.ma, save))
        if (cfg.mixed_precision, cfg.batch_size) in fail:
            raise fail[(cfg.mixed_precision, cfg.batch_size)]
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"step": s, "total": 0.5, "overflow_skips": 0, "sec_per_step": cfg.batch_size + s / 10,
                 "peak_memory_mb": 100.0 * s} for s in range(1, cfg.steps + 1)]
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return train


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path):
    from replication.sd15.gpu_smoke.training import Inputs, run_cases

    plan = _fake_plan({
        "a": {"ma": False, "mixed_precision": "bf16", "batch_sizes": [4, 1, 2], "ma_fd_fp32": None},
        "b": {"ma": True, "mixed_precision": "no", "batch_sizes": [2, 4], "ma_fd_fp32": None},
        "c": {"ma": True, "mixed_precision": "bf16", "batch_sizes": [8], "ma_fd_fp32": True},
    })
    fail = {("bf16", 4): torch.cuda.OutOfMemoryError("CUDA out of memory."),
            ("no", 2): RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"),
            ("bf16", 8): ValueError("a bug, not a full GPU")}
    calls, seen = [], []
    entries = run_cases(plan, _recipe(), Inputs(tmp_path, tmp_path, tmp_path), torch.device("cpu"), "CPU: test",
                        "t", elapsed=lambda: 0.0, on_entry=seen.append, train_fn=_fake_train(fail, calls),
                        log=lambda msg: None)
    got = {(e.name, e.batch_size): e for e in entries}
    assert seen == entries and len(entries) == 6
    # ascending batch size across cases; b's batch 4 is never tried after its batch 2 ran out of memory
    assert [(p, b) for p, b, _, _ in calls] == [("bf16", 1), ("bf16", 2), ("no", 2), ("bf16", 4), ("bf16", 8)]
    assert all(save is False for *_, save in calls)  # no checkpoint, no pipeline
    a2 = got[("a", 2)]
    assert a2.status == "ok" and not a2.oom and a2.method == "perflow" and a2.mixed_precision == "bf16"
    assert math.isclose(a2.sec_per_step, 2 + (0.3 + 0.4 + 0.5) / 3)  # the 3 timed steps after 2 warm-up steps
    assert math.isclose(a2.sec_per_sample, a2.sec_per_step / 2) and a2.peak_memory_mb == 500.0
    assert len(a2.step_seconds) == 5 and a2.losses == [0.5] * 5
    for key in (("a", 4), ("b", 2)):
        assert got[key].status == "oom" and got[key].oom and got[key].sec_per_step is None
        assert "allocate" in got[key].reason or "out of memory" in got[key].reason
    assert got[("b", 4)].status == "skipped" and "batch 2 of this case ran out of memory" in got[("b", 4)].reason
    assert got[("c", 8)].status == "error" and not got[("c", 8)].oom and "ValueError" in got[("c", 8)].reason


def test_cases_past_the_time_budget_are_skipped(tmp_path):
    from replication.sd15.gpu_smoke.training import Inputs, run_cases

    plan = _fake_plan({"a": {"ma": False, "mixed_precision": "no", "batch_sizes": [1, 2], "ma_fd_fp32": None}},
                      budget=10.0)
    clock = iter([0.0, 11.0])
    calls = []
    entries = run_cases(plan, _recipe(), Inputs(tmp_path, tmp_path, tmp_path), torch.device("cpu"), "CPU", "t",
                        elapsed=lambda: next(clock), on_entry=lambda e: None, train_fn=_fake_train({}, calls),
                        log=lambda msg: None)
    assert [e.status for e in entries] == ["ok", "skipped"] and len(calls) == 1
    assert "train_budget_s = 10 s used up" in entries[1].reason


def test_fp16_training_on_cpu_is_skipped_with_its_reason(tmp_path):
    from replication.sd15.gpu_smoke.training import Inputs, run_cases

    plan = _fake_plan({"a": {"ma": False, "mixed_precision": "fp16", "batch_sizes": [1], "ma_fd_fp32": None}})
    calls = []
    (entry,) = run_cases(plan, _recipe(), Inputs(tmp_path, tmp_path, tmp_path), torch.device("cpu"), "CPU", "t",
                         elapsed=lambda: 0.0, on_entry=lambda e: None, train_fn=_fake_train({}, calls),
                         log=lambda msg: None)
    assert entry.status == "skipped" and "native_amp" in entry.reason and calls == []


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    from replication.sd15.gpu_smoke.build import build_captions, build_pipeline
    from replication.sd15.gpu_smoke.training import Inputs

    root = tmp_path_factory.mktemp("smoke_inputs")
    return Inputs(build_pipeline("tiny", root / "sd15"), build_captions(root / "captions", 3, 24), root)


def test_a_real_case_is_timed_from_the_trainers_log(tiny_inputs):
    """One tiny case through the real trainer: the entry's time is the mean of the trainer's logged
    ``sec_per_step`` after the warm-up; ``save=False`` leaves no checkpoint and no pipeline."""
    from replication.sd15.gpu_smoke.training import read_log, run_cases

    plan = _fake_plan({"pf": {"ma": False, "mixed_precision": "no", "batch_sizes": [2], "ma_fd_fp32": None}},
                      warmup=1, timed=2)
    (entry,) = run_cases(plan, _recipe(), tiny_inputs, torch.device("cpu"), "CPU", torch.__version__,
                         elapsed=lambda: 0.0, on_entry=lambda e: None, log=lambda msg: None)
    out = tiny_inputs.work_dir / "train" / "pf_b2"
    log = read_log(out)
    assert entry.status == "ok", entry.reason
    assert [r["step"] for r in log] == [1, 2, 3] and entry.step_seconds == [r["sec_per_step"] for r in log]
    assert math.isclose(entry.sec_per_step, (log[1]["sec_per_step"] + log[2]["sec_per_step"]) / 2)
    assert entry.peak_memory_kind == "cpu_max_rss" and entry.peak_memory_mb > 1
    assert not (out / "checkpoints").exists() and not (out / "pipeline").exists()


def test_the_saved_parameter_counts_are_the_modules(tiny_inputs):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from replication.sd15.gpu_smoke.build import n_params, saved_param_counts

    counts = saved_param_counts(tiny_inputs.model_dir)
    path = tiny_inputs.model_dir
    assert counts == {"unet": n_params(UNet2DConditionModel.from_pretrained(path, subfolder="unet")),
                      "vae": n_params(AutoencoderKL.from_pretrained(path, subfolder="vae")),
                      "text_encoder": n_params(CLIPTextModel.from_pretrained(path, subfolder="text_encoder"))}


# ------------------------------------------------------------------- fd vs VJP: closed forms
def _probes(shape, n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, *shape), generator=gen) * 2 - 1).double()


def _compare(field, x, probes, steps):
    from replication.sd15.gpu_smoke.divergence import compare

    t = torch.zeros(x.shape[0], dtype=torch.float64)
    return compare(lambda p: field, x, t, probes, steps, ["fp32"], lambda p: nullcontext())


def test_a_linear_field_has_exact_finite_differences():
    """``v = A x``: both estimates are ``e^T A e`` exactly, at any step."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 3, 2, 2, generator=gen, dtype=torch.float64)
    probes = _probes(x.shape)

    def field(y, t):
        return (y.flatten(1) @ a.T).view_as(y)

    from replication.sd15.gpu_smoke.divergence import fd_estimate, vjp_estimate

    exact = torch.einsum("bi,ij,bj->b", probes[0].flatten(1), a, probes[0].flatten(1))
    t = torch.zeros(3, dtype=torch.float64)
    assert torch.allclose(vjp_estimate(field, x, t, probes), exact, rtol=1e-12)
    assert torch.allclose(fd_estimate(field, x, t, probes, 0.3), exact, rtol=1e-12)
    rows = _compare(field, x, probes, [1.0, 1e-1, 1e-3])
    assert [r["fd_step"] for r in rows] == [1.0, 1e-1, 1e-3]
    assert all(r["status"] == "ok" and r["rel_error"] < 1e-12 for r in rows)


def test_a_quadratic_field_has_the_closed_form_finite_difference_error():
    """``v_i = a_i x_i^2``: VJP ``sum 2 a_i x_i e_i^2``; the forward difference adds
    ``h sum a_i e_i^3 = h sum a_i e_i`` (Rademacher), so the relative error is
    ``h ||sum a_i e_i|| / ||sum 2 a_i x_i||`` over the batch."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    probes = _probes(x.shape)
    e = probes[0]
    reference = (2 * a * x).flatten(1).sum(-1)
    bias = (a * e).flatten(1).sum(-1)
    rows = _compare(lambda y, t: a * y ** 2, x, probes, [0.5, 0.05, 0.005])
    for row in rows:
        expected = row["fd_step"] * float(bias.norm() / reference.norm())
        assert math.isclose(row["rel_error"], expected, rel_tol=1e-8), row
        assert math.isclose(row["reference_norm"], float(reference.norm()), rel_tol=1e-12)


def test_each_precision_is_compared_with_the_fp32_vjp_reference():
    """Per extra precision one VJP row and one row per step; a precision that cannot run is skipped
    with its reason; the reference runs in its own context."""
    from replication.sd15.gpu_smoke.divergence import compare

    entered = []

    def context(p):
        entered.append(p)
        return nullcontext()

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    scale = {"fp32": 1.0, "fp16": 1.01}  # a field whose "fp16" version is 1 % off

    def field_for(p):
        return lambda y, t: scale.get(p, 1.0) * y

    rows = compare(field_for, x, torch.zeros(2), _probes(x.shape), [0.1], ["fp32", "fp16", "bf16"], context,
                   unsupported=lambda p: "no bf16 here" if p == "bf16" else None)
    keyed = {(r["estimator"], r["precision"], r["fd_step"]): r for r in rows}
    assert list(keyed) == [("fd", "fp32", 0.1), ("vjp", "fp16", None), ("fd", "fp16", 0.1),
                           ("vjp", "bf16", None), ("fd", "bf16", 0.1)]
    assert keyed[("fd", "fp32", 0.1)]["rel_error"] < 1e-12
    assert math.isclose(keyed[("vjp", "fp16", None)]["rel_error"], 0.01, rel_tol=1e-9)
    assert math.isclose(keyed[("fd", "fp16", 0.1)]["rel_error"], 0.01, rel_tol=1e-9)
    assert keyed[("fd", "bf16", 0.1)]["status"] == "skipped" and keyed[("fd", "bf16", 0.1)]["reason"] == "no bf16 here"
    assert entered[0] == "fp32" and "bf16" not in entered


def test_fp32_passes_leave_an_outer_autocast_and_tf32():
    from replication.sd15.gpu_smoke.divergence import pass_precision

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(x).dtype == torch.bfloat16
            with pass_precision(torch.device("cpu"), "fp32"):
                assert lin(x).dtype == torch.float32
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pass_precision(torch.device("cpu"), "bf16"):
            assert lin(x).dtype == torch.bfloat16
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ------------------------------------------------------------------------------ kill mechanics
def test_kill_when_sends_sigkill_to_the_process_group_once_ready(tmp_path):
    from replication.sd15.gpu_smoke.resume import kill_when

    flag, child = tmp_path / "ready", tmp_path / "child.pid"
    code = ("import subprocess, sys, time, pathlib; "
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"pathlib.Path({str(child)!r}).write_text(str(c.pid)); "
            f"pathlib.Path({str(flag)!r}).write_text('1'); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    assert kill_when(proc, flag.exists, timeout_s=30)
    assert proc.returncode == -signal.SIGKILL
    pid = int(child.read_text())
    for _ in range(100):  # the grandchild (a dataloader worker, say) went with the group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        import time

        time.sleep(0.05)
    else:
        pytest.fail("the child process outlived the kill")
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    assert not kill_when(done, lambda: False, timeout_s=30)  # exited first: not killed
    assert done.returncode == 0


# ------------------------------------------------------------------------------- JSON schema
def _stamp(**kw):
    return {"device": "Fake GPU 80GB", "torch": "9.9", "wall_s": 1.0, "status": "ok", **kw}


def _train(method, precision, batch, sec, fd=None, status="ok", peak=1000.0):
    ok = status == "ok"
    return TrainCase(**_stamp(status=status), name=f"{method}_{precision}_{fd}", method=method,
                     mixed_precision=precision, ma_fd_fp32=fd, batch_size=batch, gradient_checkpointing=True,
                     oom=status == "oom", warmup_steps=1, timed_steps=2, sec_per_step=sec if ok else None,
                     sec_per_sample=sec / batch if ok else None, peak_memory_mb=peak if ok else None,
                     peak_memory_kind="cuda_max_allocated")


def fake_report(size="full") -> SmokeReport:
    env = Environment(device="Fake GPU 80GB", device_type="cuda", torch="9.9", cuda="12.0", diffusers="0.1",
                      accelerate="0.1", transformers="0.1", cpu_threads=16)
    return SmokeReport(
        schema=1, size=size, complete=True, started="2030-01-01T00:00:00+00:00", wall_s=400.0, environment=env,
        plan={}, recipe={},
        components=Components(**_stamp(), kind="sd15", image_size=512, unet_params=859520964),
        train=[_train("perflow", "fp16", 1, 0.5), _train("perflow", "fp16", 8, 2.0, peak=30 * 1024.0),
               _train("perflow", "fp16", 32, 0.0, status="oom"),
               _train("perflow_ma", "fp16", 1, 1.0, fd=True), _train("perflow_ma", "fp16", 8, 4.0, fd=True,
                                                                      peak=60 * 1024.0),
               _train("perflow_ma", "fp16", 8, 3.0, fd=False)],
        resume=ResumeCheck(**_stamp(), method="perflow_ma", mixed_precision="fp16", batch_size=1,
                           checkpoint_step=2, killed_after_step=3, resumed_at_step=2, final_step=4,
                           checkpoint_bytes=14 * 2**30, checkpoint_files={"model.safetensors": 1}),
        generation=[GenerationCase(**_stamp(), model="student", scheduler="perflow", steps=4, guidance=4.5,
                                   dtype="float16", batch_size=4, n_images=8, unet_passes_per_image=8,
                                   sec_per_image=0.1, images_per_s=10.0)],
        divergence=[DivergenceCase(**_stamp(), estimator="fd", fd_step=0.01, precision="fp32", rel_error=1e-3),
                    DivergenceCase(**_stamp(), estimator="fd", fd_step=0.01, precision="fp16", rel_error=0.05)])


def test_the_report_round_trips_and_refuses_what_it_does_not_know(tmp_path):
    report = fake_report()
    report.train[0].losses = [1.0, float("nan")]
    path = tmp_path / "smoke.json"
    write_report(report, path)
    back = read_report(path)
    assert back.train[0].losses == [1.0, None]  # NaN is no JSON value
    assert back.resume.checkpoint_bytes == 14 * 2**30 and back.environment.device == "Fake GPU 80GB"
    assert back.train[2].oom and back.divergence[1].rel_error == 0.05
    data = json.loads(path.read_text())
    data["train"][0]["status"] = "fine"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"train\[0\]\.status = 'fine'"):
        read_report(path)
    data["train"][0]["status"] = "ok"
    data["train"][0]["speed"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"train\[0\]\.speed"):
        read_report(path)


# -------------------------------------------------------------------------------- cost table
def test_pass_counts_are_the_documented_ones():
    from replication.sd15.gpu_smoke.cost_table import PassCounts, pass_counts

    plain = PassCounts(teacher_steps=8, cfg_passes=1, ma_substeps=1, ma_probes=1, checkpointing=False)
    assert (plain.plain(), plain.perflow(), plain.perflow_ma()) == (3, 11, 18)  # 11F / 3F = 3.7x
    ckpt = PassCounts(teacher_steps=8, cfg_passes=1, ma_substeps=1, ma_probes=1, checkpointing=True)
    assert (ckpt.plain(), ckpt.perflow(), ckpt.perflow_ma()) == (4, 12, 21)
    baked = PassCounts(teacher_steps=8, cfg_passes=2, ma_substeps=2, ma_probes=1, checkpointing=False)
    assert (baked.perflow(), baked.perflow_ma()) == (3 + 16, 19 + 2 * 2 * 3 + 2)
    assert pass_counts(load_params(GPU_PARAMS)["sd15_train"]) == ckpt


def test_the_docs_cost_table_is_the_generators_output():
    doc = (ROOT / "docs" / "gpu.md").read_text()
    assert cost_table.block(doc) == cost_table.table(), "stale: python -m replication.sd15.gpu_smoke.cost_table"
    if not (ROOT / cost_table.REPORT).is_file():  # nothing measured: every figure says so
        body = cost_table.block(doc)
        assert "measured on" not in body
        cells = [line.split(" | ")[-1] for line in body.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert len(cells) >= 15 and all(c.startswith(("estimated", "no estimate", "not measured")) for c in cells)


def test_the_generator_marks_measured_and_estimated_figures(tmp_path):
    path = tmp_path / "results" / "gpu" / "smoke.json"
    write_report(fake_report(), path)
    (tmp_path / "replication" / "gpu").mkdir(parents=True)
    (tmp_path / "replication" / "gpu" / "params.yaml").write_text(GPU_PARAMS.read_text())
    body = cost_table.table(root=tmp_path)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in body.splitlines() if line.startswith("| ")}

    def row(name, exact=False):
        (key,) = [k for k in rows if (k == name if exact else k.startswith(name))]
        value, source = rows[key]
        return value, source.rstrip(" |")

    value, source = row("PeRFlow step")
    assert value == "0.250 s (2.00 s/step)"  # batch 8, the largest that ran
    assert source == "measured on Fake GPU 80GB (fp16, gradient checkpointing, batch 8)"
    assert row("PeRFlow + MA step")[0] == "0.500 s (4.00 s/step)"
    assert row("PeRFlow + MA / PeRFlow")[0] == "2.00x"            # 4.0 / 2.0 at batch 8
    assert row("MA finite differences in fp32 / in fp16")[0] == "1.33x"  # 4.0 / 3.0
    value, source = row("PeRFlow bf16 / fp16")                    # no bf16 case: the estimate
    assert value == "none" and source.startswith("no estimate") and source.endswith("(not in the smoke report)")
    value, source = row("peak memory per GPU, PeRFlow", exact=True)
    assert value == "30.0 GiB" and source.endswith("peak allocated; out of memory at batch 32")
    assert row("accelerate checkpoint")[0] == "14.0 GiB" and row("accelerate checkpoint")[1].startswith("measured on")
    value, source = row("training, 4,000 steps x 1,024 samples on 8 GPUs, PeRFlow", exact=True)
    assert value == f"{4000 * 1024 * 0.25 / 8 / 3600:.0f} h" and "estimated from the step time measured on" in source
    assert row("generation, PeRFlow student 4 steps")[0].startswith("0.100 s")
    assert row("generation, PeRFlow student 4 steps")[1].startswith("measured on Fake GPU 80GB")
    value, source = row("generation, PeRFlow student 8 steps")
    assert source.startswith("estimated") and source.endswith("(not in the smoke report)")
    assert row("MA finite difference vs VJP")[0] == "0.001 (fp32), 0.05 (fp16)"
    assert row("kill (SIGKILL) and resume")[0].startswith("ok: killed after step 3, resumed at 2")
    assert "Fake GPU 80GB, torch 9.9" in body.splitlines()[-1]

    write_report(fake_report(size="tiny"), path)
    with pytest.raises(ConfigError, match="size = 'tiny'"):
        cost_table.table(root=tmp_path)


def test_the_generator_rewrites_only_its_block(tmp_path):
    doc = f"# title\nbefore\n{cost_table.START}\nold table\n{cost_table.END}\nafter\n"
    new = cost_table.synced(doc, "| new |\n")
    assert new == f"# title\nbefore\n{cost_table.START}\n| new |\n{cost_table.END}\nafter\n"
    assert cost_table.block(new) == "| new |\n"
    with pytest.raises(ValueError, match="no"):
        cost_table.synced("no markers", "x")


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_the_tiny_command_runs_end_to_end(tmp_path):
    """``python -m replication.sd15.gpu_smoke --size tiny`` writes a complete report with every
    section; the kill-and-resume case resumes at the checkpoint and repeats its loss exactly."""
    from replication.sd15.gpu_smoke.training import schedule

    out, work = tmp_path / "smoke.json", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "replication.sd15.gpu_smoke", "--size", "tiny", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[gpu_smoke] train perflow_bf16 batch 1" in proc.stdout  # progress is printed
    report = read_report(out)
    plan = load_plan("tiny")
    assert report.complete and report.size == "tiny" and not work.exists()
    device = report.environment.device
    assert device.startswith("CPU") and report.environment.torch == torch.__version__
    entries = [report.components, *report.train, report.resume, *report.generation, *report.divergence]
    assert all(e.device == device and e.torch == torch.__version__ and e.wall_s >= 0 for e in entries)
    assert report.components.unet_params > 0 and report.components.kind == "tiny"
    # training: every scheduled case, fp16 skipped on CPU with its reason, the rest measured
    assert [(t.name, t.batch_size) for t in report.train] == [(n, b) for n, _, b in schedule(plan)]
    for t in report.train:
        if t.mixed_precision == "fp16":
            assert t.status == "skipped" and "autocast" in t.reason
        else:
            assert t.status == "ok", t.reason
            assert t.sec_per_step > 0 and t.peak_memory_mb > 0 and len(t.losses) == 2
    assert {(t.ma_fd_fp32, t.status) for t in report.train if t.method == "perflow_ma"} >= {(True, "ok"), (False, "ok")}
    # kill and resume
    r = report.resume
    assert r.status == "ok", (r.reason, r.checks)
    assert r.first_exit == -signal.SIGKILL and r.killed_after_step > r.checkpoint_step == plan.resume.checkpoint_step
    assert r.resumed_at_step == r.checkpoint_step
    assert r.steps_after_resume == list(range(r.checkpoint_step + 1, r.checkpoint_step + plan.resume.resume_steps + 1))
    assert math.isclose(r.loss_after_resume, r.loss_before_kill, rel_tol=1e-6)  # fp32 on CPU: the same step
    assert r.checkpoint_bytes == sum(r.checkpoint_files.values()) > 0
    assert {"model.safetensors", "optimizer.bin"} <= set(r.checkpoint_files)
    # generation and divergence
    assert [(g.model, g.steps) for g in report.generation] == [("student", 4), ("student", 8), ("teacher", 25)]
    assert all(g.status == "ok" and g.images_per_s > 0 for g in report.generation)
    assert [g.unet_passes_per_image for g in report.generation] == [8, 16, 50]
    d = {(x.estimator, x.precision, x.fd_step): x for x in report.divergence}
    assert len(d) == 3 + 2 * 4 and all(x.status == "ok" for x in d.values())
    fp32 = [d[("fd", "fp32", h)].rel_error for h in plan.divergence.fd_steps]
    assert fp32 == sorted(fp32, reverse=True)  # in fp32 the O(step) bias dominates


def test_the_smoke_profile_is_no_params_overlay(tmp_path):
    """``python -m replication.profile gpu_smoke`` refuses it, naming the section it does not know."""
    from replication.profile import apply_profile

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"^gpu_smoke = .*unknown params section"):
        apply_profile("gpu_smoke", params, ROOT / "replication" / "profiles")
    assert params.read_text() == (ROOT / "params.yaml").read_text()


def test_the_sd15_builder_writes_a_folder_the_tier_loads(tmp_path, monkeypatch):
    """``build_sd15_random`` with narrowed copies of the published configs (the same layout, small
    widths): the folder passes the input check, loads with ``load_components``, and its scheduler
    gives SD 1.5's noise table; a 512-px caption folder reads at 512 px."""
    from replication.sd15 import vp
    from replication.sd15.components import load_components
    from replication.sd15.data import CaptionFolder
    from replication.sd15.gpu_smoke import build
    from replication.sd15.inputs import check_pipeline_dir

    published = build.sd15_config
    narrow = {"unet": {"block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "sample_size": 8},
              "vae": {"block_out_channels": [32, 32, 32, 32], "sample_size": 64},
              "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "projection_dim": 32}}
    monkeypatch.setattr(build, "sd15_config", lambda part: {**published(part), **narrow.get(part, {})})
    out = build.build_sd15_random(tmp_path / "sd15")
    assert check_pipeline_dir(out) == out and not (tmp_path / ".sd15.tmp").exists()
    comps = load_components(out, torch.device("cpu"), torch.float32)
    assert type(comps.student).__name__ == "UNet2DConditionModel" and len(comps.tokenizer) == 49408
    assert torch.allclose(comps.alphas_cumprod, vp.sd15_alphas_cumprod(), rtol=1e-6)
    assert build.saved_param_counts(out)["unet"] == build.n_params(comps.student)
    data = build.build_captions(tmp_path / "captions", n_images=2, size=512)
    item = CaptionFolder(data, comps.tokenizer, 512)[1]
    assert item["pixel_values"].shape == (3, 512, 512) and item["input_ids"].shape == (77,)


@pytest.mark.parametrize(("change", "failed"), [
    ({}, []),
    ({"resumed_at_step": 0}, ["resumed_at_newest_checkpoint"]),          # started over
    ({"steps_after_resume": [3, 4, 5]}, ["logged_the_steps_after_the_checkpoint"]),
    ({"steps_after_resume": [4]}, ["logged_the_steps_after_the_checkpoint"]),
    ({"first_exit": 0}, ["killed_by_sigkill"]),
    ({"resume_exit": 1}, ["resume_exit_0"]),
])
def test_the_resume_checks_flag_each_departure(tmp_path, change, failed):
    from replication.sd15.gpu_smoke.resume import resume_checks

    (tmp_path / "finished.json").write_text('{"steps": 4}')
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    fields = {"first_exit": -signal.SIGKILL, "resume_exit": 0, "checkpoint_step": 2, "resumed_at_step": 2,
              "steps_after_resume": [3, 4], **change}
    entry = ResumeCheck(**_stamp(), method="perflow_ma", mixed_precision="no", batch_size=1, **fields)
    checks = resume_checks(entry, [0.1, 0.2], 4, tmp_path)
    assert sorted(k for k, ok in checks.items() if not ok) == failed
    assert not resume_checks(entry, [0.1, float("nan")], 4, tmp_path)["finite_losses"]
    assert not resume_checks(entry, [0.1, 0.2], 5, tmp_path)["finished_at_the_final_step"]
