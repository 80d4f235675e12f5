"""The 2-D ablation: which part of the method does the work, and at what training cost.

A *variant* is a student of ``toy2d_train`` as the test table trains it (its tuned ``lambda`` when
``toy2d_test`` selects one, ``replication.toy2d.selection``), with optional ``overrides`` of the
sweepable settings (``replication.toy2d.sweep.OVERRIDES``) and the loss ``terms`` it optimizes
(``tm+ma`` the method's own, ``ma`` the MA term alone). Every variant is trained on the first
``n_seeds`` test seeds; a variant that *is* a test-table student (no overrides, its own terms) is
not retrained: its test-stage runs are loaded (their fingerprints guarantee they are the same runs).

Training cost per step is measured deterministically, so that it can sit in a committed table:
``step_cost`` counts the floating-point operations of one training step (forward and backward,
``torch.utils.flop_counter``: matrix products and convolutions, the operations that dominate) and
the bytes of the tensors autograd saves for the backward pass (the activation memory, the part of
the peak that grows with the method). Wall-clock time varies run to run; its ratios are measured by
``benchmarks/bench_ablation_cost.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, require
from .config import TrainStageConfig
from .sweep import OVERRIDES, _set, finite


@dataclass
class Variant:
    """One ablation row: ``student`` (of ``toy2d_train``), ``overrides``, ``terms``, ``description``."""

    student: str
    description: str
    terms: str = "tm+ma"
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        from .tier import LOSS_TERMS

        require(self.terms in LOSS_TERMS, f"{where}.terms", self.terms, f"one of {LOSS_TERMS}")
        for key in self.overrides:
            require(key in OVERRIDES, f"{where}.overrides.{key}", self.overrides[key],
                    f"not a sweepable setting; known: {sorted(OVERRIDES)}")
            require(finite(self.overrides[key]), f"{where}.overrides.{key}", self.overrides[key],
                    "expected a finite number")

    @property
    def reuses_test_run(self) -> bool:
        """The variant is its student as the test table trained it."""
        return not self.overrides and self.terms == "tm+ma"


@dataclass
class AblationConfig:
    """The ``toy2d_ablation`` section: the variants, on the first ``n_seeds`` test seeds."""

    n_seeds: int = 3
    variants: dict[str, Variant] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(self.n_seeds >= 2, f"{where}.n_seeds", self.n_seeds, "need >= 2 seeds for an interval")
        require(len(self.variants) >= 1, f"{where}.variants", self.variants, "list at least one variant")


def variant_students(config: AblationConfig, tuned: dict[str, tuple[TrainStageConfig, Any]]):
    """``{variant: (train_cfg, student)}``: each variant's tuned student with its overrides."""
    built = {}
    for name, variant in config.variants.items():
        where = f"toy2d_ablation.variants.{name}"
        if variant.student not in tuned:
            raise ConfigError(f"{where}.student = {variant.student!r}: not in toy2d_train.students "
                              f"({sorted(tuned)})")
        cfg, student = tuned[variant.student]
        if variant.terms == "ma" and not student.ma:
            raise ConfigError(f"{where}.terms = 'ma': student {variant.student!r} has no MA term")
        try:
            for key, value in variant.overrides.items():
                cfg, student = _set(cfg, student, key, value)
        except Exception as err:  # the library's own refusal, mapped to the key
            raise ConfigError(f"{where}.overrides = {variant.overrides}: {err}") from None
        student.validate(where)
        built[name] = (cfg, student)
    return built


class _FlopCount:
    """A dispatch mode that sums ``torch.utils.flop_counter``'s formulas over every operation it sees
    (FlopCounterMode itself tracks modules with backward hooks, which ``autograd.grad`` inside the
    MA term's Jacobian refuses)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        class Mode(TorchDispatchMode):
            total = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    self.total += formula(*args, **kwargs, out_val=out)
                return out

        return Mode()


def step_cost(objective, model: torch.nn.Module, batch, step: int, seed: int) -> dict[str, float]:
    """FLOPs (forward + backward) and autograd-saved bytes of one training step of ``objective``
    on ``batch`` at ``step`` (MA runs only on its steps), with the step's own random stream."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    generator = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with _FlopCount() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = objective(model, batch, step, generator)
        terms.total.backward()
    model.zero_grad(set_to_none=True)
    return {"mflops_per_step": counter.total / 1e6, "saved_mib_per_step": saved / 2**20}
