"""The shared training loop: bit-identical resume, non-finite losses, atomic checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from marflow_core import (
    DistillationObjective,
    GaussianMixtureTeacher,
    MAConfig,
    NonFiniteLossError,
    PeRFlowSampler,
    TimeMLP,
    TimeWindows,
    TrainConfig,
    load_checkpoint,
    train,
)
from marflow_core.atomic import atomic_torch_save, atomic_write_text


@pytest.fixture
def setup():
    teacher = GaussianMixtureTeacher([0.5, 0.5], [[1.5, 0.0], [-1.5, 0.5]], [0.4, 0.6])
    sampler = PeRFlowSampler(TimeWindows(2), teacher, teacher_steps=2)
    objective = DistillationObjective(sampler, teacher, MAConfig(weight=0.1, every=2))

    def batch_fn(step, generator):
        return teacher.sample(32, 1.0, generator)

    return objective, batch_fn


def _model(seed: int = 0) -> TimeMLP:
    torch.manual_seed(seed)
    return TimeMLP(2, 16, 2, time_dim=8)


def _config(**kw) -> TrainConfig:
    base = dict(steps=30, lr=3e-3, checkpoint_every=10, log_every=5, warmup=4)
    return TrainConfig(**{**base, **kw})


def _train(*args, seed: int = 5, **kwargs):
    """``train`` with the run seed of these tests."""
    return train(*args, seed=seed, **kwargs)


class Crash(RuntimeError):
    pass


def test_resume_after_crash_is_bit_identical(setup, tmp_path):
    objective, batch_fn = setup
    cfg = _config()
    reference = _model()
    ref = _train(reference, objective, batch_fn, cfg, tmp_path / "a", progress=False)
    assert ref.resumed_from == 0 and [h["step"] for h in ref.history] == [5, 10, 15, 20, 25, 30]
    assert {"tm", "ma", "total"} <= set(ref.history[0])

    def crashing(step, generator):
        if step == 25:
            raise Crash("simulated crash")
        return batch_fn(step, generator)

    with pytest.raises(Crash):
        _train(_model(), objective, crashing, cfg, tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 20
    resumed_model = _model(seed=123)  # different init: the weights must come from the checkpoint
    res = _train(resumed_model, objective, batch_fn, cfg, tmp_path / "b", progress=False)
    assert res.resumed_from == 20 and res.steps == 30
    assert res.history == ref.history
    a, b = reference.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the final checkpoints agree too, optimizer state included
    ca = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert ca["step"] == cb["step"] == 30
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
    # a different seed gives a different run (the comparison above is not vacuous)
    other = _model()
    _train(other, objective, batch_fn, cfg, None, progress=False, seed=6)
    assert not all(torch.equal(a[k], other.state_dict()[k]) for k in a)
    # a finished run resumes to a no-op
    again = _train(_model(seed=9), objective, batch_fn, cfg, tmp_path / "a", progress=False)
    assert again.resumed_from == 30 and again.history == ref.history


def test_non_finite_loss_raises_before_the_update(setup, tmp_path):
    objective, batch_fn = setup

    def poisoned(step, generator):
        x = batch_fn(step, generator)
        return x * float("nan") if step == 7 else x

    model = _model()
    with pytest.raises(NonFiniteLossError, match="step 7"):
        _train(model, objective, poisoned, _config(checkpoint_every=5), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 5
    # no update happened at step 7: the weights are those after 7 clean steps
    clean = _model()
    _train(clean, objective, batch_fn, _config(steps=7, checkpoint_every=5), None, progress=False)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in clean.state_dict().items())


def test_non_finite_gradient_raises_before_the_update(setup, tmp_path):
    """A finite loss with an infinite gradient (sqrt at 0) must not reach the weights."""
    objective, batch_fn = setup

    def sqrt_at_zero(model, batch, step, generator):
        terms = objective(model, batch, step, generator)
        if step == 3:
            first = next(model.parameters()).sum()
            terms.total = terms.total + torch.sqrt(first - first.detach())  # value 0, gradient inf
        return terms

    model = _model()
    with pytest.raises(NonFiniteLossError, match="gradient norm at step 3"):
        _train(model, sqrt_at_zero, batch_fn, _config(), tmp_path, progress=False)
    clean = _model()
    _train(clean, objective, batch_fn, _config(steps=3), None, progress=False)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in clean.state_dict().items())


def test_only_final_checkpoint_files_exist(setup, tmp_path):
    objective, batch_fn = setup
    cfg = _config(steps=20, checkpoint_every=7, snapshot_every=10)
    model = _model()
    _train(model, objective, batch_fn, cfg, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["last.pt", "step_0000010.pt", "step_0000020.pt"]
    fresh = _model(seed=1)
    state = load_checkpoint(tmp_path / "run" / "last.pt", fresh)
    assert state["step"] == 20 and state["config"]["checkpoint_every"] == 7
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    snap = torch.load(tmp_path / "run" / "step_0000010.pt", weights_only=False)
    assert snap["step"] == 10 and [h["step"] for h in snap["history"]] == [5, 10]


def test_atomic_save_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_torch_save({"bad": lambda: None}, path)  # lambdas cannot be pickled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    atomic_write_text("hello", tmp_path / "sub" / "t.txt")
    assert (tmp_path / "sub" / "t.txt").read_text() == "hello"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["t.txt"]


def test_train_config_validation():
    for bad in [dict(steps=0), dict(lr=0.0), dict(checkpoint_every=0), dict(log_every=0),
                dict(snapshot_every=-1), dict(warmup=-1)]:
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_ma_term_needs_a_teacher(setup):
    objective, _ = setup
    with pytest.raises(ValueError):
        DistillationObjective(objective.sampler, None, MAConfig())


def test_logged_steps_split_the_gradient_into_the_tm_and_ma_terms():
    """With MA on, a logged step records ||grad L_TM|| and ||grad (lambda L_MA)||, computed apart
    here from the same batch: the split is exact (the MA part is the total's minus the TM's)."""
    import math

    from marflow_core import LossTerms

    model = torch.nn.Linear(3, 1, bias=False).double()  # float64: the subtraction loses nothing visible
    torch.nn.init.constant_(model.weight, 0.5)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)

    def objective(m, batch, step, gen):
        tm = m(x).pow(2).sum()             # grad = 2 (w.x) x
        ma = 0.1 * m.weight.pow(2).sum()   # grad = 0.2 w
        return LossTerms(tm + ma, {"tm": float(tm), "ma": float(ma), "total": float(tm + ma)},
                         first_term=tm)

    from marflow_core import TrainConfig, train

    result = train(model, objective, lambda s, g: None, TrainConfig(steps=1, lr=1e-9, log_every=1, grad_clip=0.0),
                   progress=False)
    record = result.history[-1]
    w = torch.full((3,), 0.5, dtype=torch.float64)
    assert record["grad_norm_tm"] == pytest.approx(float((2 * (w @ x[0]) * x[0]).norm()), rel=1e-12)
    assert record["grad_norm_ma"] == pytest.approx(float((0.2 * w).norm()), rel=1e-12)
    assert math.isfinite(record["grad_norm_tm"])


def test_evaluate_callback_logs_held_out_values_and_leaves_training_unchanged(setup):
    """``evaluate`` runs after the update of each logged step, in eval mode, without gradients; the
    weights end bit-identical to a run without it."""
    objective, batch_fn = setup
    cfg = _config(checkpoint_every=30)
    probe = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    seen = []

    def evaluate(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return {"heldout": model(probe, torch.full((64,), 0.5)).pow(2).mean()}

    plain, scored = _model(), _model()
    _train(plain, objective, batch_fn, cfg, None, progress=False)
    result = _train(scored, objective, batch_fn, cfg, None, progress=False, evaluate=evaluate)
    for a, b in zip(plain.state_dict().values(), scored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["step"] for r in result.history if "heldout" in r] == [5, 10, 15, 20, 25, 30]
    assert seen == [(False, False)] * 6
    with torch.no_grad():  # the last logged value is the final model's
        expected = float(scored(probe, torch.full((64,), 0.5)).pow(2).mean())
    assert result.history[-1]["heldout"] == pytest.approx(expected, rel=1e-6)
