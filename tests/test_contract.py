"""The shared contract: the one optimizer config, trajectory distances, the student spec, banks.

Each check is against a closed form or a direct recomputation: AdamW's decoupled decay after one
step, the objective's ``L_TM`` for a given distance, the MA overrides of a student, the reuse rule of
sharded banks.
"""

from __future__ import annotations

import pytest
import torch

from marflow_core import DistillationObjective, MAConfig, TrainConfig, WindowBatch
from marflow_core.banks import generate_shards
from marflow_core.errors import InvalidParameter
from marflow_core.trajectory import trajectory_matching_loss
from replication.common.methods import known_methods, method_record
from replication.common.students import StudentSpec
from replication.config import ConfigError, from_dict


def _one_step(optimizer: str, weight_decay: float) -> float:
    """``p = 1`` after one step on the loss ``0 * p`` (gradient 0) at lr 0.1."""
    p = torch.nn.Parameter(torch.ones(()))
    opt = TrainConfig(lr=0.1, optimizer=optimizer, weight_decay=weight_decay).make_optimizer([p])
    (0 * p).backward()
    opt.step()
    return float(p.detach())


def test_adamw_decay_is_decoupled_and_adam_decay_is_l2():
    # AdamW: p <- p (1 - lr wd) = 0.99; Adam + L2: g = wd p = 0.1, first step moves lr g / |g| = 0.1
    assert _one_step("adamw", 0.1) == pytest.approx(0.99, abs=1e-7)
    assert _one_step("adam", 0.1) == pytest.approx(0.9, abs=1e-6)
    assert _one_step("adam", 0.0) == 1.0


def test_optimizer_fields_are_validated():
    for bad in ({"optimizer": "sgd"}, {"betas": [0.9]}, {"betas": [0.9, 1.0]}, {"weight_decay": -1.0},
                {"batch_size": 0}):
        with pytest.raises(InvalidParameter):
            TrainConfig(**bad)
    assert TrainConfig(warmup=4).lr_at(1) == pytest.approx(1e-3 * 2 / 4)


def _batch() -> WindowBatch:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.rand(6, generator=g)
    return WindowBatch(x, y, torch.zeros(6, dtype=torch.long), t, torch.zeros(6), torch.ones(6))


def test_the_objective_uses_its_trajectory_distance():
    wb = _batch()

    def student(x, t):
        return 0.5 * x + t[:, None]

    expected = (student(wb.point(), wb.t) - (wb.y_end - wb.x_start)).abs().mean()
    objective = DistillationObjective(lambda batch, gen: wb, distance=lambda v, u: (v - u).abs())
    assert objective(student, None, 0, None).parts["tm"] == pytest.approx(float(expected), rel=1e-6)
    # a per-element cost is averaged over dims per sample; a per-sample cost is taken as it is
    per_dim = trajectory_matching_loss(student, wb, per_sample=True)
    residual = student(wb.point(), wb.t) - (wb.y_end - wb.x_start)
    assert torch.allclose(per_dim, residual.pow(2).mean(1))
    norms = trajectory_matching_loss(student, wb, per_sample=True,
                                     distance=lambda v, u: (v - u).norm(dim=1))
    assert torch.allclose(norms, residual.norm(dim=1))


def test_student_spec_overrides_and_method_rules():
    shared = MAConfig(weight=0.1, substeps=2)
    spec = from_dict(StudentSpec, {"method": "perflow", "windows": 4, "ma": True, "ma_weight": 0.5,
                                   "ma_substeps": 3, "seeds": [0]}, "s")
    assert (spec.ma_config(shared).weight, spec.ma_config(shared).substeps) == (0.5, 3)
    assert from_dict(StudentSpec, {"method": "perflow", "windows": 4, "ma": False, "seeds": [0]},
                     "s").ma_config(shared) is None
    with pytest.raises(ConfigError, match=r"s.seeds: required key is missing"):
        from_dict(StudentSpec, {"method": "perflow", "windows": 4, "ma": False}, "s")
    with pytest.raises(ConfigError, match=r"s.windows = 4: reflow uses K = 1"):
        from_dict(StudentSpec, {"method": "reflow", "windows": 4, "ma": False, "seeds": [0]}, "s")
    with pytest.raises(ConfigError, match=r"s.method = 'nosuch': unknown method; known methods: "
                                          r"\['perflow', 'reflow'"):
        from_dict(StudentSpec, {"method": "nosuch", "windows": 1, "ma": False, "seeds": [0]}, "s")
    with pytest.raises(ConfigError, match=r"s.ma_weight = 0.5: has no effect"):
        from_dict(StudentSpec, {"method": "perflow", "windows": 4, "ma": False, "ma_weight": 0.5,
                                "seeds": [0]}, "s")
    assert {"perflow", "reflow"} <= set(known_methods())
    assert method_record("reflow").windows == 1 and method_record("perflow").pairing == "windows"


def test_a_bank_reuses_only_matching_shards(tmp_path):
    calls = []

    def make(seed: int, size: int) -> dict[str, torch.Tensor]:
        calls.append((seed, size))
        return {"x": torch.randn(size, 2, generator=torch.Generator().manual_seed(seed))}

    args = (tmp_path, "s{seed}.pt", 10, 4, 7, "test-shard")
    first = generate_shards(*args, {"steps": 8}, make, progress=False)
    assert [size for _, size in calls] == [4, 4, 2]
    generate_shards(*args, {"steps": 8}, make, progress=False)
    assert len(calls) == 3  # every shard found
    generate_shards(tmp_path, "s{seed}.pt", 12, 4, 7, "test-shard", {"steps": 8}, make, progress=False)
    assert [size for _, size in calls[3:]] == [4]  # only the partial last shard is remade
    generate_shards(*args, {"steps": 16}, make, progress=False)
    assert len(calls) == 7  # other settings: every shard remade
    assert len(first) == 3 and len({p.name for p in first}) == 3
