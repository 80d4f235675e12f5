"""Failure modes of the SD 1.5 trainer and evaluator that only a GPU run would meet, reproduced on CPU
with the tiny stand-ins: fp16 overflow skips, the EMA's device after a resume, float32
finite-difference passes under accelerate's autocast, float32 timesteps under bf16, the evaluation's
weight files, fp16-variant folders, the learning-rate schedule and the logged step cost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from marflow_core.errors import NonFiniteLossError
from marflow_core.marginal import MAConfig
from replication.common.students import StudentSpec
from replication.config import ConfigError
from replication.sd15 import vp
from replication.sd15.config import PeRFlowSD15Config, SD15TrainConfig
from replication.sd15.objective import PeRFlowSD15Objective, TextConditioning

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = vp.sd15_alphas_cumprod()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test builds its own ``Accelerator`` (mixed precision differs): reset accelerate's shared state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    from replication.sd15.tiny import build_tiny_sd, write_caption_folder

    root = tmp_path_factory.mktemp("gpu_fixes")
    return {"sd": build_tiny_sd(root / "sd"), "data": write_caption_folder(root / "data", n=4)}


def _train_cfg(inputs: dict[str, Path], out: Path, **over) -> SD15TrainConfig:
    kw = {"model_dir": str(inputs["sd"]), "data_dir": str(inputs["data"]), "output_dir": str(out),
          "resolution": 16, "steps": 2, "batch_size": 2, "mixed_precision": "no", "checkpoint_every": 1,
          "log_every": 1, "dataloader_workers": 0, "lr": 1e-3, "ema_decay": 0.5,
          "perflow": PeRFlowSD15Config(teacher_steps=2),
          "student": StudentSpec(method="perflow", windows=4, ma=True, seeds=[0])}
    kw.update(over)
    return SD15TrainConfig(**kw)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ 1. fp16 overflow
def _overflowing_accelerator(monkeypatch, overflow_steps: set[int], scales: list[float]) -> None:
    """``accelerate.Accelerator`` replaced by one with a CPU GradScaler under fp16 (accelerate makes
    none on CPU) whose gradient overflows (an inf entry) at the given steps; the scale before each
    optimizer step goes to ``scales``."""
    import accelerate
    from accelerate.accelerator import Accelerator  # the class itself, also once this is patched

    class OverflowingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
                self.native_amp = True
            self.backward_calls = 0

        def backward(self, loss, **kwargs) -> None:
            super().backward(loss, **kwargs)
            if self.backward_calls in overflow_steps:
                param = next(p for p in self._models[0].parameters() if p.grad is not None)
                param.grad.view(-1)[0] = float("inf")
            self.backward_calls += 1
            scales.append(float(self.scaler.get_scale()) if self.scaler is not None else 1.0)

    monkeypatch.setattr(accelerate, "Accelerator", OverflowingAccelerator)


def test_fp16_overflow_is_a_skipped_step_until_max_overflow_skips(tiny_inputs, tmp_path, monkeypatch):
    """Under fp16 an overflowed gradient is a GradScaler skip (the scale halves, training goes on,
    the log counts it); ``max_overflow_skips`` consecutive skips stop the run naming the step."""
    from replication.sd15.train import train

    scales: list[float] = []
    _overflowing_accelerator(monkeypatch, {0}, scales)
    out = tmp_path / "one_skip"
    train(_train_cfg(tiny_inputs, out, mixed_precision="fp16", max_overflow_skips=2, steps=3,
                     checkpoint_every=10), progress=False)
    log = _log(out)
    assert [row["step"] for row in log] == [1, 2, 3]
    assert log[0]["grad_norm"] is None and log[0]["overflow_skips"] == 1
    assert all(row["grad_norm"] > 0 and row["overflow_skips"] == 1 for row in log[1:])
    assert scales[0] == 2.0**10 and scales[1] == 2.0**9  # the skip lowered the scale

    _overflowing_accelerator(monkeypatch, {0, 2, 3}, scales)
    with pytest.raises(NonFiniteLossError, match=r"step 3: 2 consecutive fp16 overflow skips"):
        train(_train_cfg(tiny_inputs, tmp_path / "stops", mixed_precision="fp16", max_overflow_skips=2,
                         steps=5, checkpoint_every=10), progress=False)


def test_non_finite_gradient_without_a_grad_scaler_stops_at_once(tiny_inputs, tmp_path, monkeypatch):
    from replication.sd15.train import train

    _overflowing_accelerator(monkeypatch, {0}, [])
    with pytest.raises(NonFiniteLossError, match=r"step 0: non-finite gradient norm"):
        train(_train_cfg(tiny_inputs, tmp_path / "no_scaler", steps=2), progress=False)


# ------------------------------------------------------------------------- 2. EMA device after resume
@pytest.fixture(scope="module")
def resumed_run(tiny_inputs, tmp_path_factory) -> dict:
    """A 1-step run, then its resume to 2 steps, recording the resume's ``load_state`` and every
    ``EMAModel.to`` in order."""
    import accelerate
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import EMAModel

    from replication.sd15.train import train

    out = tmp_path_factory.mktemp("resume") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    train(_train_cfg(tiny_inputs, out, steps=1), progress=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    events: list[tuple] = []
    original_to = EMAModel.to

    class Recording(accelerate.Accelerator):
        def load_state(self, *args, **kwargs):
            result = super().load_state(*args, **kwargs)
            events.append(("load_state", self.device))
            return result

    def recording_to(self, device=None, dtype=None, non_blocking=False):
        events.append(("ema.to", None if device is None else torch.device(device)))
        return original_to(self, device=device, dtype=dtype, non_blocking=non_blocking)

    def recording_step(self, parameters):
        parameters = list(parameters)
        events.append(("ema.step", {p.device for p in self.shadow_params}, {p.device for p in parameters}))
        return original_step(self, parameters)

    original_step = EMAModel.step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accelerate, "Accelerator", Recording)
        mp.setattr(EMAModel, "to", recording_to)
        mp.setattr(EMAModel, "step", recording_step)
        train(_train_cfg(tiny_inputs, out, steps=2), progress=False)
    return {"out": out, "events": events}


def test_resume_moves_the_ema_to_the_accelerator_device(resumed_run):
    """accelerate reloads the EMA onto the CPU and ``EMAModel.load_state_dict`` keeps it there: the
    trainer moves it to the accelerator's device after ``load_state``, before the first EMA update."""
    events = resumed_run["events"]
    names = [e[0] for e in events]
    loaded = names.index("load_state")
    device = events[loaded][1]
    moved = [i for i, e in enumerate(events) if e[0] == "ema.to" and i > loaded and e[1] == device]
    first_step = names.index("ema.step")
    assert moved and moved[0] < first_step
    shadow_devices, param_devices = events[first_step][1], events[first_step][2]
    assert shadow_devices == param_devices == {device}


# ------------------------------------------------------------------------ 7. seconds per step, memory
def test_the_log_records_seconds_per_step_and_peak_memory(resumed_run):
    log = _log(resumed_run["out"])
    assert [row["step"] for row in log] == [1, 2]
    for row in log:
        assert row["sec_per_step"] > 0 and row["peak_memory_mb"] > 1
        assert row["overflow_skips"] == 0 and row["grad_norm"] > 0


def test_gpu_doc_states_the_step_cost_from_pass_counts():
    text = (ROOT / "docs" / "gpu.md").read_text()
    assert "2.5x" not in text
    assert "`3F + 8F =\n11F`, about **3.7x**" in text and "`4F + 8F = 12F`, about 3x" in text
    assert "`sec_per_step` and `peak_memory_mb`" in text


# ------------------------------------------------------------------- 3. float32 finite differences
class RecordingUNet(torch.nn.Module):
    """``eps = conv(x)`` (1x1) recording, per call, its batch size, the dtype of its activation,
    whether autocast is on and the TF32 flags."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.calls: list[dict] = []

    def forward(self, x, timestep, text):
        h = self.conv(x)
        self.calls.append({"rows": x.shape[0], "dtype": h.dtype, "autocast": torch.is_autocast_enabled(x.device.type),
                           "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)})
        return SimpleNamespace(sample=h)


def _noise(b: int, shape: tuple[int, ...], tau: float, n_probes: int = 1) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    u = torch.full((b,), (1000 - tau) / 1000 + 1e-6, dtype=torch.float64)
    probes = torch.randint(0, 2, (n_probes, b, *shape), generator=gen).float() * 2 - 1
    return SimpleNamespace(u=u, noise=torch.randn(b, *shape, generator=gen), probes=probes)


def test_finite_difference_passes_run_in_float32_under_accelerates_bf16_autocast():
    """accelerate wraps the prepared model's forward in its own autocast (bf16 on CPU too), which an
    outer ``autocast(enabled=False)`` does not reach: the MA context swaps in the model's own forward
    and turns TF32 off, restoring both after."""
    from accelerate import Accelerator

    from replication.sd15.train import ma_context

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    student = accelerator.prepare(RecordingUNet(2))
    cfg = SD15TrainConfig(model_dir="m", data_dir="d", output_dir="o", mixed_precision="bf16",
                          student=StudentSpec(method="perflow", windows=4, ma=True, seeds=[0]))
    ma = MAConfig(weight=1.0, substeps=1, divergence="hutchinson_fd", n_probes=1, fd_step=1e-2)
    objective = PeRFlowSD15Objective(lambda x, t, c: SimpleNamespace(sample=0.5 * x), ALPHAS,
                                     PeRFlowSD15Config(teacher_steps=2), 4, ma, ma_fd_fp32=True)
    b, shape = 2, (2, 3, 3)
    text = torch.zeros(b, 3, 2, dtype=torch.bfloat16)
    latents = torch.randn(b, *shape).to(torch.bfloat16)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with accelerator.autocast():
            loss, parts = objective(student, latents, _noise(b, shape, 600.0), TextConditioning(text, text, text, 1.0),
                                    True, ma_context(accelerator, cfg, student))
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    calls = accelerator.unwrap_model(student).calls
    tm_pass, fd_passes = calls[0], calls[1:]
    assert tm_pass["dtype"] == torch.bfloat16 and tm_pass["autocast"]  # the trajectory-matching pass
    assert [c["rows"] for c in fd_passes] == [2 * b]  # x and x + h e in one call (one probe, one sub-step)
    assert all(c["dtype"] == torch.float32 and not c["autocast"] and c["tf32"] == (False, False)
               for c in fd_passes)
    assert after == (True, True)
    student(latents, torch.ones(b), text)  # the accelerate forward is back after the context
    assert calls[-1]["dtype"] == torch.bfloat16 and set(parts) == {"tm", "ma", "total"}


# -------------------------------------------------------------------------- 4. float32 timesteps
def test_timesteps_reach_the_unets_unrounded_under_bf16():
    """bf16 holds only multiples of 4 between 512 and 1024: the student (trajectory matching and MA
    passes) and the teacher get their timesteps in float32, whatever the activations' dtype."""
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}

    def recording(name: str, c: float):
        def unet(x, timestep, text):
            seen[name].append(timestep)
            return SimpleNamespace(sample=c * x)
        return unet

    ma = MAConfig(weight=1.0, substeps=1, divergence="hutchinson_fd", n_probes=1, fd_step=1e-2)
    objective = PeRFlowSD15Objective(recording("teacher", 0.5), ALPHAS, PeRFlowSD15Config(teacher_steps=8), 4, ma,
                                     ma_fd_fp32=False)
    b, shape = 2, (2, 3, 3)
    text = torch.zeros(b, 3, 2, dtype=torch.bfloat16)
    latents = torch.randn(b, *shape).to(torch.bfloat16)
    objective(recording("student", 0.3), latents, _noise(b, shape, 513.0), TextConditioning(text, text, text, 1.0),
              True)
    student = seen["student"]
    assert all(ts.dtype == torch.float32 for ts in student + seen["teacher"])
    assert student[0].tolist() == [513.0, 513.0]  # trajectory matching at tau = 513
    assert all(ts.tolist() == [750.0] * len(ts) for ts in student[1:])  # MA passes from the window start
    grid = torch.linspace(750, 500, 9, dtype=torch.float64).round()[:-1] - 1  # the teacher's table indices
    assert [float(ts[0]) for ts in seen["teacher"][:8]] == grid.tolist()


# ------------------------------------------------------------------ 5. evaluation weights, variants
def _fake_eval(tmp_path: Path, **over):
    from replication.sd15.config import ModelSpec, SD15EvalConfig
    from replication.sd15.inputs import _PIPELINE_FILES
    from replication.sd15.tiny import write_coco_folder

    sd = tmp_path / "sd"
    for alternatives, _ in _PIPELINE_FILES:
        (sd / alternatives[0]).parent.mkdir(parents=True, exist_ok=True)
        (sd / alternatives[0]).write_text("{}")
    kw = {"coco_dir": str(write_coco_folder(tmp_path / "coco", n=3)), "output_dir": str(tmp_path / "out"),
          "n_prompts": 3, "resolution": 16, "mixed_precision": "no", "clip_checkpoint": None,
          "models": {"teacher": ModelSpec(path=str(sd), scheduler="ddim", steps=[4])}}
    kw.update(over)
    return SD15EvalConfig(**kw)


@pytest.mark.parametrize(("over", "needles"), [
    ({"fid_extractor_weights": "nowhere/inception.pth"}, ("fid_extractor_weights = 'nowhere/inception.pth'",)),
    ({"fid_extractor_weights": None}, ("fid_extractor_weights = null", "weights-inception-2015-12-05-6726825d.pth")),
    ({"fid_extractor_weights": "SELF", "clip_checkpoint": "nowhere/clip.bin"},
     ("clip_checkpoint = 'nowhere/clip.bin'", "CLIP checkpoint")),
])
def test_evaluation_refuses_before_generating_when_a_weights_file_is_missing(tmp_path, monkeypatch, over,
                                                                             needles):
    """FID runs after 5,000 images per setting: its weights (and a named CLIP checkpoint) are checked
    with the inputs, before any pipeline is loaded or image generated, naming the key."""
    from replication.sd15 import evaluate, metrics

    if over.get("fid_extractor_weights") == "SELF":
        over = {**over, "fid_extractor_weights": str(Path(__file__))}  # an existing file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    generated: list = []
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: generated.append("load") or object())
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: generated.append("generate") or tmp_path)

    def offline_fid(*args, **kwargs):
        raise FileNotFoundError("torch-fidelity: no network to download the Inception weights")

    monkeypatch.setattr(metrics, "fid", offline_fid)
    cfg = _fake_eval(tmp_path, **over)
    with pytest.raises(ConfigError) as err:
        evaluate.evaluate(cfg, clip_scorer=lambda images, captions: torch.zeros(len(images)),
                          device=torch.device("cpu"), progress=False)
    for needle in needles:
        assert needle in str(err.value)
    assert generated == [] and not (tmp_path / "out").exists()


def test_the_gpu_eval_section_names_local_weight_files():
    params = yaml.safe_load((ROOT / "replication" / "gpu" / "params.yaml").read_text())["sd15_eval"]
    assert params["fid_extractor_weights"].startswith("replication/gpu/inputs/")
    assert params["clip_checkpoint"].startswith("replication/gpu/inputs/")


def test_a_folder_of_fp16_variant_files_loads(tiny_inputs, tmp_path):
    """``*.fp16.safetensors`` pass the input check; diffusers loads them only with ``variant="fp16"``."""
    from diffusers import StableDiffusionPipeline

    from replication.sd15.components import load_components, load_sd_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_inputs["sd"], safety_checker=None, local_files_only=True)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_sd_pipeline(tmp_path / "fp16")
    assert torch.equal(next(loaded.unet.parameters()), next(pipe.unet.parameters()))
    comps = load_components(tmp_path / "fp16", torch.device("cpu"), torch.float32)
    assert next(comps.student.parameters()).dtype == torch.float32
    shutil.rmtree(tmp_path / "fp16")


# ---------------------------------------------------------------------------- 6. learning rate
def test_the_default_learning_rate_is_constant_as_in_perflows_script():
    """PeRFlow's public training script runs ``--lr_scheduler constant`` (its ``--lr_warmup_steps``
    are then ignored): no warm-up, in the dataclass and in the GPU params."""
    cfg = SD15TrainConfig(model_dir="m", data_dir="d", output_dir="o",
                          student=StudentSpec(method="perflow", windows=4, ma=False, seeds=[0]))
    assert cfg.warmup == 0 and cfg.lr_at(0) == cfg.lr_at(499) == cfg.lr
    params = yaml.safe_load((ROOT / "replication" / "gpu" / "params.yaml").read_text())
    assert params["sd15_train"]["warmup"] == params["sd15_train_perflow"]["warmup"] == 0
