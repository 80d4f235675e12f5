"""Faults survived: killed training, damaged or mismatched checkpoints, non-finite values.

``TRAINING_DRIVERS`` lists one small training run per tier (a function building the model, the
objective and the batches from the tier's own code); a new tier is covered by adding its entry.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from marflow_core import (
    CheckpointError,
    NonFiniteLossError,
    TimeMLP,
    TrainConfig,
    load_checkpoint,
    train,
)
from marflow_core.atomic import atomic_torch_save
from marflow_core.integrity import with_digest

ROOT = Path(__file__).resolve().parents[1]

# One entry per tier: the Python source of a function ``build() -> (model, objective, batch_fn,
# TrainConfig, meta)`` that uses the tier's own builders on a tiny setting.
TRAINING_DRIVERS = {
    "toy2d": textwrap.dedent("""
        from replication.config import load_params
        from replication.registry import section
        from replication.toy2d.tier import build_objective, make_model, make_teacher, student_meta

        def build(work):
            params = load_params(ROOT / "params.yaml")
            toy, cfg = section(params, "toy2d"), section(params, "toy2d_train")
            student = cfg.students["perflow_ma"]
            objective, batch_fn = build_objective(student, cfg, make_teacher(toy), work / "pairs",
                                                  progress=False, seed=toy.seed)
            torch.manual_seed(0)
            model = make_model(cfg)
            config = TrainConfig(steps=60, lr=2e-3, checkpoint_every=4, snapshot_every=8,
                                 log_every=4, warmup=5)
            return model, objective, lambda step, gen: batch_fn(step, gen)[:64], config, \\
                student_meta("perflow_ma", student)
    """),
    "images": textwrap.dedent("""
        from dataclasses import replace
        from marflow_core.unet import UNetConfig
        from replication.config import load_params
        from replication.registry import section
        from replication.images.tier import build_objective, make_model, student_meta

        def build(work):
            params = load_params(ROOT / "params.yaml")
            images, cfg = section(params, "images"), section(params, "images_students")
            images = replace(images, model=UNetConfig(widths=[8, 16], norm_groups=4))
            cfg = replace(cfg, batch_size=16, window_bank=replace(
                cfg.window_bank, n_entries=64, shard_size=32, teacher_steps=1))
            student = cfg.students["perflow_ma"]
            torch.manual_seed(1)
            teacher = make_model(images).eval().requires_grad_(False)
            data = torch.rand(32, images.channels, images.size, images.size) * 2 - 1
            objective, batch_fn = build_objective(student, cfg, images, teacher, data, work / "banks",
                                                  progress=False)
            torch.manual_seed(0)
            model = make_model(images)
            config = TrainConfig(steps=40, lr=1e-3, checkpoint_every=4, snapshot_every=8,
                                 log_every=4, warmup=5)
            return model, objective, batch_fn, config, student_meta("perflow_ma", 0, student)
    """),
}

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from marflow_core import TrainConfig, train
    import marflow_core.atomic as atomic
    ROOT = Path(sys.argv[1])
    {build}
    work = Path(sys.argv[2])
    model, objective, batch_fn, config, meta = build(work)  # banks are written before the count starts
    kill_at_save = int(os.environ.get("KILL_AT_SAVE", "0"))
    if kill_at_save:  # die half-way through the N-th checkpoint write
        real_save, calls = torch.save, [0]
        def dying_save(obj, fh, *args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at_save:
                fh.write(b"PK\\x03\\x04 half a checkpoint")
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, fh, *args, **kwargs)
        atomic.torch.save = dying_save
    train(model, objective, batch_fn, config, work / "run", progress=False, meta=meta, seed=3)
    print("finished")
""")


def _driver(tmp_path: Path, tier: str) -> Path:
    path = tmp_path / f"driver_{tier}.py"
    path.write_text(DRIVER.replace("{build}", textwrap.indent(TRAINING_DRIVERS[tier], "")))
    return path


def _launch(driver: Path, work: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(driver), str(ROOT), str(work)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(driver: Path, work: Path, **env) -> None:
    proc = _launch(driver, work, **env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "finished" in out, err[-3000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {**state["model"], **{f"opt{i}.{k}": v for i, s in state["optimizer"]["state"].items()
                                 for k, v in s.items() if torch.is_tensor(v)}}


@pytest.mark.slow
@pytest.mark.parametrize("tier", sorted(TRAINING_DRIVERS))
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, tier):
    driver = _driver(tmp_path, tier)
    _finish(driver, tmp_path / "clean")
    reference = _weights(tmp_path / "clean" / "run" / "last.pt")

    work = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for kill_at_save in (2, 5, 8):  # die inside checkpoint and snapshot writes
        proc = _launch(driver, work, KILL_AT_SAVE=str(kill_at_save))
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        assert list((work / "run").glob(".*.tmp")), "the killed write should leave its temporary file"
        kills += 1
    for _ in range(3):  # and at random moments
        proc = _launch(driver, work)
        deadline = time.monotonic() + 60
        while not list((work / "run").glob("last.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += proc.returncode == -signal.SIGKILL
    assert kills >= 3
    _finish(driver, work)
    assert not list((work / "run").glob(".*.tmp"))
    resumed = _weights(work / "run" / "last.pt")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    # every file of the run folder (snapshots included) is there and byte-identical
    names = sorted(p.name for p in (tmp_path / "clean" / "run").iterdir())
    assert names == sorted(p.name for p in (work / "run").iterdir())
    for name in names:
        assert (work / "run" / name).read_bytes() == (tmp_path / "clean" / "run" / name).read_bytes(), name


def _tiny_model(hidden: int = 8) -> TimeMLP:
    torch.manual_seed(0)
    return TimeMLP(2, hidden, 1, time_dim=4)


def _save_checkpoint(path: Path, model: TimeMLP, meta: dict | None = None) -> None:
    atomic_torch_save(with_digest({"model": model.state_dict(), "optimizer": {}, "step": 3, "history": [],
                                   "config": {}, "meta": meta}), path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_checkpoint", "empty"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    _save_checkpoint(path, _tiny_model())
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 not a torch file" * 50)
    elif damage == "not_a_checkpoint":
        torch.save({"weights": torch.ones(2)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, _tiny_model())


def test_checkpoint_of_another_architecture_or_method_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    _save_checkpoint(path, _tiny_model(hidden=8), meta={"method": "perflow", "windows": 4})
    with pytest.raises(CheckpointError, match=rf"{path}: its weights do not fit"):
        load_checkpoint(path, _tiny_model(hidden=16))
    with pytest.raises(CheckpointError, match=rf"{path}: made for .*perflow.*, not for .*reflow"):
        load_checkpoint(path, _tiny_model(), meta={"method": "reflow", "windows": 1})
    load_checkpoint(path, _tiny_model(), meta={"method": "perflow", "windows": 4})  # the right one


def _overwrite_inside(path: Path, tensor: torch.Tensor, n_bytes: int = 800) -> None:
    """Overwrite ``n_bytes`` inside ``tensor``'s stored bytes with 0xFF (NaN as float32); the zip
    container stays valid, so the file still opens."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    start = data.find(raw[:256])
    assert start >= 0 and len(raw) >= 100 + n_bytes
    data[start + 100:start + 100 + n_bytes] = b"\xff" * n_bytes
    path.write_bytes(bytes(data))


def test_a_checkpoint_overwritten_inside_a_tensor_is_refused(tmp_path):
    """800 bytes of a weight tensor overwritten: the file still loads with torch, but its tensors no
    longer match the digest written with it."""
    from marflow_core.training import _save

    model = _tiny_model(hidden=64)
    path = tmp_path / "last.pt"
    _save(path, model, torch.optim.Adam(model.parameters()), 3, [], TrainConfig(steps=3), 0, None)
    weight = max(model.state_dict().values(), key=torch.Tensor.numel)
    _overwrite_inside(path, weight)
    state = torch.load(path, weights_only=True)  # the container is intact ...
    assert not torch.isfinite(max(state["model"].values(), key=torch.Tensor.numel)).all()
    with pytest.raises(CheckpointError, match=rf"{path}: its tensors do not match the content digest"):
        load_checkpoint(path, _tiny_model(hidden=64))  # ... the content is not


def test_a_checkpoint_without_a_digest_is_refused_saying_so(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"model": _tiny_model().state_dict(), "optimizer": {}, "step": 3, "history": [],
                       "config": {}, "meta": None}, path)  # an older marflow's file, or another program's
    with pytest.raises(CheckpointError, match=rf"{path}: has no content digest \(tensor_sha256\)"):
        load_checkpoint(path, _tiny_model())


def test_non_finite_weights_are_refused_even_with_a_valid_digest(tmp_path):
    model = _tiny_model()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    path = tmp_path / "last.pt"
    _save_checkpoint(path, model)
    with pytest.raises(CheckpointError, match=rf"{path}: 1 weight tensor\(s\) hold NaN or infinite values"):
        load_checkpoint(path, _tiny_model())


def test_a_damaged_bank_shard_is_refused_on_load_and_made_again(tmp_path):
    from marflow_core.banks import generate_shards, load_shards

    def make(seed: int, size: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(size, 300, generator=torch.Generator().manual_seed(seed))}

    (path,) = generate_shards(tmp_path, "shard_{seed}.pt", 4, 4, 0, "test", {"kind": "t"}, make, progress=False)
    good = load_shards([path], ("x",))["x"].clone()
    _overwrite_inside(path, good)
    with pytest.raises(CheckpointError, match=rf"{path}: its tensors do not match"):
        load_shards([path], ("x",))
    generate_shards(tmp_path, "shard_{seed}.pt", 4, 4, 0, "test", {"kind": "t"}, make, progress=False)
    assert torch.equal(load_shards([path], ("x",))["x"], good)  # the damaged shard was made anew


class Quadratic:
    """loss = |w|^2 + (a value that can be poisoned) on a model with parameters."""

    def __init__(self, poison_at: int | None = None, poison=float("nan"), teacher_nan: bool = False):
        self.poison_at, self.poison, self.teacher_nan = poison_at, poison, teacher_nan

    def __call__(self, model, batch, step, generator):
        from marflow_core import LossTerms

        if self.teacher_nan and step == self.poison_at:
            raise NonFiniteLossError("the teacher (or the pair bank) gave non-finite y_end in 3 entries")
        loss = sum(p.pow(2).sum() for p in model.parameters())
        if step == self.poison_at:
            loss = loss * 0 + self.poison
        return LossTerms(loss, {"tm": float(loss.detach()), "total": float(loss.detach())})


@pytest.mark.parametrize(("poison", "message"), [(float("nan"), "non-finite loss at step 7"),
                                                 (float("inf"), "non-finite loss at step 7"),
                                                 (1e12, "loss exploded at step 7")])
def test_non_finite_or_exploding_loss_stops_and_keeps_the_last_checkpoint(tmp_path, poison, message):
    model = _tiny_model()
    config = TrainConfig(steps=20, lr=1e-2, checkpoint_every=5, log_every=5)
    with pytest.raises(NonFiniteLossError, match=message):
        train(model, Quadratic(7, poison), lambda s, g: None, config, tmp_path, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_teacher_nan_stops_with_a_message_naming_the_teacher(tmp_path):
    from marflow_core import DistillationObjective, PeRFlowSampler, TimeWindows

    def nan_teacher(x, t):
        return torch.full_like(x, float("nan"))

    objective = DistillationObjective(PeRFlowSampler(TimeWindows(2), nan_teacher, teacher_steps=1))
    with pytest.raises(NonFiniteLossError, match=r"step 0: the teacher .* non-finite y_end"):
        train(_tiny_model(), objective, lambda s, g: torch.randn(8, 2, generator=g),
              TrainConfig(steps=3, checkpoint_every=1), tmp_path, progress=False)
    assert not (tmp_path / "last.pt").exists()


def test_stale_temporary_files_are_removed_and_never_loaded(tmp_path):
    model = _tiny_model()
    config = TrainConfig(steps=4, lr=1e-2, checkpoint_every=2, log_every=2)
    train(model, Quadratic(), lambda s, g: None, config, tmp_path, progress=False)
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    resumed = train(_tiny_model(), Quadratic(), lambda s, g: None, config, tmp_path, progress=False)
    assert resumed.resumed_from == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    config = TrainConfig(steps=4, lr=1e-2, checkpoint_every=2, log_every=2)
    train(_tiny_model(), Quadratic(), lambda s, g: None, config, tmp_path, progress=False,
          meta={"method": "perflow"})
    with pytest.raises(CheckpointError, match="not for {'method': 'reflow'}"):
        train(_tiny_model(), Quadratic(), lambda s, g: None, config, tmp_path, progress=False,
              meta={"method": "reflow"})


def test_resumed_checkpoint_files_are_byte_identical(tmp_path):
    """Snapshots and last.pt of a run interrupted after step 6 and resumed equal, byte for byte,
    those of an uninterrupted run (DVC hashes these files)."""
    config = TrainConfig(steps=12, lr=1e-2, checkpoint_every=3, snapshot_every=6, log_every=3)
    train(_tiny_model(), Quadratic(), lambda s, g: None, config, tmp_path / "a", progress=False,
          meta={"method": "m"})

    def stop_after_six(step, generator):
        if step == 7:
            raise KeyboardInterrupt
        return None

    with pytest.raises(KeyboardInterrupt):
        train(_tiny_model(), Quadratic(), stop_after_six, config, tmp_path / "b", progress=False,
              meta={"method": "m"})
    train(_tiny_model(), Quadratic(), lambda s, g: None, config, tmp_path / "b", progress=False,
          meta={"method": "m"})
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["last.pt", "step_0000006.pt", "step_0000012.pt"]
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
