"""The tier registry: how a tier tells the harness its params sections and its stages.

The harness (``stage.py``, ``notebook.py``, ``profile.py``, ``retrain.py``) imports no tier. A tier is
a sub-package of ``replication`` with a module ``stages.py`` that defines ``TIER = Tier(...)``; it is
found by ``tiers()`` at run time, so a new tier plugs in by adding files, never by editing the runner.

A stage is either a notebook stage (``StageSpec``: a jupytext notebook executed by papermill, the
CPU tiers' tables and figures) or a module stage (``ModuleStage``: a function called with the
validated sections, the GPU tiers' training and evaluation, which ``accelerate launch`` can start in
every process). Both kinds read their sections from their tier's ``params_file`` and go through the
same validation, so every params file obeys the same rules (unknown keys, bad values and keys
without effect are errors naming the key).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .config import ConfigError, from_dict, require

#: harness files and shared folders every notebook stage depends on (``dvc.yaml`` lists them, with
#: the active profile's overlay ``replication/profiles/${profile}.yaml``; a test checks it)
HARNESS_FILES: tuple[str, ...] = (
    "replication/config.py",
    "replication/notebook.py",
    "replication/registry.py",
    "replication/reproducible.py",
    "replication/stage.py",
    "replication/common",
    "replication/methods",
)
#: top-level ``params.yaml`` keys that belong to no tier
GLOBAL_KEYS: tuple[str, ...] = ("profile",)

CrossCheck = Callable[[dict[str, Any]], None]
#: ``params -> reason`` when a stage cannot run on these params by design (an unlabelled image
#: folder and a stage that needs labels), else None; decided at validation
SkipRule = Callable[[dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class StageSpec:
    """A notebook stage: its ``notebooks/<name>.py``, the params ``sections`` it reads (the notebook
    receives exactly these), its results folder and the cross-section ``checks`` run before work.
    ``threads`` is the CPU thread count its kernel runs with (``OMP_NUM_THREADS``): small-tensor work
    is fastest single-threaded, since OpenMP threads spin on a loaded machine."""

    name: str
    notebook: str
    sections: tuple[str, ...]
    out_dir: str
    checks: tuple[CrossCheck, ...] = ()
    threads: int = 1
    skip_rules: tuple[SkipRule, ...] = ()

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return _validate_stage(self, params)

    def skip_reason(self, params: dict[str, Any]) -> str | None:
        """Why this stage is skipped on ``params`` (the first rule that gives a reason), or None."""
        return next((r for r in (rule(params) for rule in self.skip_rules) if r), None)


@dataclass(frozen=True)
class ModuleStage:
    """A stage that calls ``entry`` (``"package.module:function"``) as ``function(configs, progress)``
    with ``configs`` the validated dataclasses of its ``sections`` (by name); the function returns a
    JSON-able summary, which the runner prints. ``threads`` as for ``StageSpec``."""

    name: str
    entry: str
    sections: tuple[str, ...]
    checks: tuple[CrossCheck, ...] = ()
    threads: int = 1

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return _validate_stage(self, params)

    def function(self) -> Callable[[dict[str, Any], bool], Any]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


Stage = StageSpec | ModuleStage


def _validate_stage(spec: Stage, params: dict[str, Any]) -> dict[str, Any]:
    """The stage's sections as given, after validating each and the cross-section checks."""
    for name in spec.sections:
        section(params, name)
    for check in spec.checks:
        check(params)
    return {name: params.get(name, {}) for name in spec.sections}


@dataclass(frozen=True)
class Tier:
    """A tier: its params ``sections`` (name -> dataclass), its ``stages``, the folders its training
    stages persist between runs (``retrain`` deletes them to start from scratch) and the
    ``params_file`` its sections live in (the GPU tiers keep theirs beside their own DVC project)."""

    name: str
    sections: dict[str, type]
    stages: tuple[Stage, ...]
    persistent_outputs: tuple[str, ...] = field(default_factory=tuple)
    params_file: str = "params.yaml"


@cache
def tiers() -> dict[str, Tier]:
    """Every tier: each ``replication/<pkg>/stages.py`` that defines ``TIER``."""
    package = importlib.import_module(__package__)
    found: dict[str, Tier] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        pkg_dir = Path(package.__path__[0]) / info.name
        if not (pkg_dir / "stages.py").exists():
            continue
        tier = importlib.import_module(f"{__package__}.{info.name}.stages").TIER
        if not isinstance(tier, Tier):
            raise TypeError(f"replication/{info.name}/stages.py: TIER must be a Tier")
        found[tier.name] = tier
    _check_unique(found)
    return found


def _check_unique(found: dict[str, Tier]) -> None:
    """A params section or a stage name belongs to one tier only."""
    for kind in ("section", "stage"):
        owners: dict[str, str] = {}
        for tier in found.values():
            for name in tier.sections if kind == "section" else [s.name for s in tier.stages]:
                if name in owners:
                    raise ValueError(f"{kind} {name!r} is claimed by tiers {owners[name]!r} and "
                                     f"{tier.name!r}")
                owners[name] = tier.name


def sections(params_file: str | None = None) -> dict[str, type]:
    """Every params section of every tier (of the tiers whose sections live in ``params_file``):
    name -> dataclass."""
    return {name: cls for tier in tiers().values() for name, cls in tier.sections.items()
            if params_file is None or tier.params_file == params_file}


def stages() -> dict[str, Stage]:
    """Every stage of every tier, by name."""
    return {stage.name: stage for tier in tiers().values() for stage in tier.stages}


def tier_of(stage_name: str) -> Tier:
    """The tier that registers stage ``stage_name``."""
    return next(t for t in tiers().values() if any(s.name == stage_name for s in t.stages))


def stage(name: str) -> Stage:
    """The stage called ``name``; an unknown name raises ``ConfigError`` listing the known ones."""
    known = stages()
    if name not in known:
        raise ConfigError(f"stage = {name!r}: unknown stage; known stages: {sorted(known)}")
    return known[name]


def section(params: dict[str, Any], name: str):
    """The validated dataclass of section ``name`` of a params dict."""
    known = sections()
    if name not in known:
        raise ConfigError(f"{name} = ...: unknown params section; known: {sorted(known)}")
    if name not in params:
        raise ConfigError(f"{name}: params section is missing; every stage that reads it needs it "
                          f"written out in the params file")
    return from_dict(known[name], params[name], name)


def validate_all(params: dict[str, Any], params_file: str = "params.yaml") -> None:
    """Every section present, every cross-section check of the stages whose sections are all present,
    and no unknown top-level key, for the tiers whose sections live in ``params_file``. (A stage's
    own sections must be present: ``section`` refuses a missing one by name.)"""
    chosen = [t for t in tiers().values() if t.params_file == params_file]
    known = {name for t in chosen for name in t.sections}
    for key in params:
        require(key in known or key in GLOBAL_KEYS, key, params[key],
                f"unknown params section; known: {sorted([*known, *GLOBAL_KEYS])}")
    for name in sorted(known):
        if name in params:
            section(params, name)
    for spec in (s for t in chosen for s in t.stages):
        if all(name in params for name in spec.sections):
            spec.validate(params)
