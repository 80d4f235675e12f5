"""Hyper-parameter sweeps of the 2-D tier: one family per swept setting, trained on validation seeds.

A *family* varies one setting of one student of ``toy2d_train.students`` (``parameter``, a key of
``OVERRIDES``) over a grid of ``values``, with optional ``fixed`` overrides shared by every point
(a family on the continuous log-det sets ``ma.logdet: continuous`` there). ``baseline: true`` also
trains the student's no-MA twin at every point, so a setting that changes both (the window count
``K``) shows the MA effect at each value. Every point is trained on every validation seed of
``toy2d_sweep`` (never a test seed: the selection that reads these results is honest only if the
reported tables use other seeds, ``replication.toy2d.selection``) and scored with the exact 2-D
metrics at every NFE of the sweep; a cell is the mean over seeds with its Student-t interval.

Each family is its own DVC stage (``toy2d_sweep@<family>``): changing one value of one grid re-runs
that family only, and inside it the run folders of unchanged points are resumed from their
checkpoints (``fingerprint.json``), so only the new point trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from marflow_core.errors import InvalidParameter

from ..common.stats import seed_interval
from ..common.students import StudentSpec
from ..config import ConfigError, check_nfe_list, require
from .config import EvalConfig, Toy2DConfig, TrainStageConfig

#: the settings a family may vary, with what each one is
OVERRIDES: dict[str, str] = {
    "ma.weight": "lambda, the MA weight (0: the MA term is off)",
    "ma.substeps": "student sub-steps n per window of the MA term",
    "ma.logdet": "log-det mode: discrete (exact log|det(I + hJ)| of the Euler sub-steps) or continuous",
    "ma.divergence": "divergence of the continuous log-det: exact, hutchinson (VJP) or hutchinson_fd",
    "ma.n_probes": "Hutchinson probes per sample",
    "ma.fd_step": "finite-difference step of hutchinson_fd",
    "ma.window_weights": "per-window multipliers of the MA term",
    "windows": "number of windows K",
    "perflow.teacher_steps": "teacher solver steps per window of the PeRFlow targets",
}

#: metrics aggregated over seeds per (point, NFE); ``*_hw`` is the half-width of their interval
METRICS: tuple[str, ...] = ("kl", "tv", "mode_mass_error", "off_mode", "sliced_w2", "folded")


@dataclass
class SweepFamily:
    """One swept setting: ``parameter`` of student ``student`` over ``values``."""

    student: str
    parameter: str
    values: list[Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False

    def validate(self, where: str) -> None:
        require(self.parameter in OVERRIDES, f"{where}.parameter", self.parameter,
                f"not a sweepable setting; known: {sorted(OVERRIDES)}")
        require(len(self.values) >= 1, f"{where}.values", self.values, "list at least one value")
        labels = [value_label(v) for v in self.values]
        repeated = sorted({v for v in labels if labels.count(v) > 1})
        require(not repeated, f"{where}.values", self.values, f"{repeated} listed more than once")
        for i, value in enumerate(self.values):
            require(finite(value), f"{where}.values[{i}]", value, "expected a finite number")
        for key in self.fixed:
            require(key in OVERRIDES, f"{where}.fixed.{key}", self.fixed[key],
                    f"not a sweepable setting; known: {sorted(OVERRIDES)}")
            require(finite(self.fixed[key]), f"{where}.fixed.{key}", self.fixed[key], "expected a finite number")
        require(self.parameter not in self.fixed, f"{where}.fixed.{self.parameter}",
                self.fixed.get(self.parameter), "the swept parameter cannot also be fixed")
        require(not (self.baseline and self.parameter.startswith("ma.")), f"{where}.baseline", self.baseline,
                f"the no-MA twin does not depend on {self.parameter}: one baseline run covers it")


@dataclass
class SweepConfig:
    """The ``toy2d_sweep`` section: the seed split, the scoring of every run, and the families."""

    validation_seeds: list[int] = field(default_factory=lambda: [100, 101, 102])
    test_seeds: list[int] = field(default_factory=lambda: [200, 201, 202, 203, 204])
    n_samples: int = 5000
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    level: float = 0.95
    families: dict[str, SweepFamily] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        for key in ("validation_seeds", "test_seeds"):
            seeds = getattr(self, key)
            require(len(seeds) >= 2, f"{where}.{key}", seeds, "need >= 2 seeds (an interval needs two)")
            require(len(set(seeds)) == len(seeds), f"{where}.{key}", seeds, "seeds repeat")
        shared = sorted(set(self.validation_seeds) & set(self.test_seeds))
        require(not shared, f"{where}.test_seeds", self.test_seeds,
                f"{shared} are validation seeds too: a value tuned on a seed is not tested on it")
        require(self.n_samples >= 2, f"{where}.n_samples", self.n_samples, "must be >= 2")
        check_nfe_list(self.nfe, f"{where}.nfe")
        require(0 < self.level < 1, f"{where}.level", self.level, "an interval level in (0, 1)")
        for name in self.families:
            require(name.replace("_", "").isalnum(), f"{where}.families.{name}", name,
                    "a family name is a stage name: letters, digits and underscores only")


def finite(value: Any) -> bool:
    """No non-finite float in ``value`` (a number, a word or a list of them)."""
    if isinstance(value, list | tuple):
        return all(finite(v) for v in value)
    return not (isinstance(value, float) and not math.isfinite(value))


def value_label(value: Any) -> str:
    """A value as a folder-safe label: ``0.3``, ``continuous``, ``0-0-0-4`` for a list."""
    if isinstance(value, list | tuple):
        return "-".join(value_label(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _set(train_cfg: TrainStageConfig, student: StudentSpec, key: str, value: Any):
    """``(train_cfg, student)`` with setting ``key`` set to ``value``."""
    if key == "windows":
        return train_cfg, replace(student, windows=value)
    section, _, name = key.partition(".")
    if section == "ma":
        if name == "weight":  # a student's own lambda would override the shared one
            student = replace(student, ma_weight=None)
        if name == "substeps":
            student = replace(student, ma_substeps=None)
        return replace(train_cfg, ma=replace(train_cfg.ma, **{name: value})), student
    return replace(train_cfg, perflow=replace(train_cfg.perflow, **{name: value})), student


@dataclass(frozen=True)
class Point:
    """One run configuration of a family: its label, value, whether it is the no-MA twin, and the
    training config and (one-seed) student it trains."""

    label: str
    value: Any
    ma: bool
    train_cfg: TrainStageConfig
    student: StudentSpec

    def run_name(self, seed: int) -> str:
        return f"{self.label}/seed{seed}"


def family_points(family: SweepFamily, train_cfg: TrainStageConfig, where: str) -> list[Point]:
    """Every point of ``family`` (and its no-MA twins with ``baseline``), validated: a value the
    library refuses stops here naming ``where.values[i]``."""
    require(family.student in train_cfg.students, f"{where}.student", family.student,
            f"no such student in toy2d_train.students ({sorted(train_cfg.students)})")
    base = train_cfg.students[family.student]
    require(base.ma or family.parameter in ("windows", "perflow.teacher_steps"), f"{where}.student",
            family.student, f"has ma: false, so {family.parameter} has no effect on it")
    points = []
    for i, value in enumerate(family.values):
        cfg, student = train_cfg, base
        try:
            for key, v in {**family.fixed, family.parameter: value}.items():
                cfg, student = _set(cfg, student, key, v)
        except InvalidParameter as err:
            raise ConfigError(f"{where}.values[{i}] = {value!r}: {err.key} {err.why}") from None
        except TypeError as err:
            raise ConfigError(f"{where}.values[{i}] = {value!r}: {err}") from None
        student.validate(f"{where}.values[{i}]")
        ma_cfg = student.ma_config(cfg.ma)
        weights = ma_cfg.window_weights if ma_cfg is not None else None
        require(weights is None or len(weights) == student.windows, f"{where}.values[{i}]", value,
                f"window_weights needs one weight per window (K = {student.windows})")
        label = value_label(value)
        points.append(Point(label, value, student.ma, cfg, student))
        if family.baseline:
            twin = replace(student, ma=False, ma_weight=None, ma_substeps=None)
            points.append(Point(f"{label}-noma", value, False, cfg, twin))
    return points


def seed_runs(points: list[Point], seeds: list[int]) -> Iterator[tuple[Point, int, StudentSpec]]:
    """``(point, seed, one-seed student)`` for every point and seed, in training order."""
    for point in points:
        for seed in seeds:
            yield point, seed, replace(point.student, seeds=[seed])


def sweep_eval_config(eval_cfg: EvalConfig, sweep: SweepConfig) -> EvalConfig:
    """The evaluation of every sweep run: the tier's, with the sweep's sample count and NFE."""
    return replace(eval_cfg, n_samples=sweep.n_samples, nfe=list(sweep.nfe),
                   mmd_samples=min(eval_cfg.mmd_samples, sweep.n_samples))


def aggregate(runs: pd.DataFrame, level: float, keys: tuple[str, ...] = ("value", "ma", "nfe")) -> list[dict]:
    """One row per ``keys`` cell of per-run rows ``runs`` (columns ``keys``, ``seed``, ``status``,
    ``crosses_windows`` and ``METRICS``): for each metric the mean over seeds and the half-width of
    its ``level`` Student-t interval (``<metric>_hw``). A cell where some seed's KL is undefined
    (``status`` not ``ok``: a folded map) has no KL / TV mean; its status says on how many seeds."""
    cells = []
    for key, group in runs.groupby(list(keys), sort=False):
        row = dict(zip(keys, key, strict=True))
        bad = group[group["status"] != "ok"]
        row["seeds"] = len(group)
        row["status"] = "ok" if bad.empty else f"{len(bad)} of {len(group)} seeds: {bad['status'].iloc[0]}"
        row["crosses_windows"] = bool(group["crosses_windows"].any())
        for metric in METRICS:
            values = [float(v) for v in group[metric]]
            if not all(math.isfinite(v) for v in values):
                row[metric], row[f"{metric}_hw"] = None, None
                continue
            interval = seed_interval(values, level)
            row[metric], row[f"{metric}_hw"] = interval.mean, interval.half_width
        cells.append(row)
    return cells


def run_family(
    family_name: str,
    family: SweepFamily,
    sweep: SweepConfig,
    toy: Toy2DConfig,
    train_cfg: TrainStageConfig,
    eval_cfg: EvalConfig,
    checkpoint_root: Path,
    train: Callable,
    load: Callable,
    evaluate: Callable,
    teacher,
    progress: bool = True,
) -> pd.DataFrame:
    """Train (or resume) and score every run of ``family`` on the validation seeds; per-run rows
    (``value``, ``label``, ``ma``, ``seed``, ``nfe`` and the metric columns). ``train``, ``load``
    and ``evaluate`` are the tier's ``train_student``, ``load_run`` and ``evaluate_student``."""
    from tqdm.auto import tqdm

    where = f"toy2d_sweep.families.{family_name}"
    points = family_points(family, train_cfg, where)
    scoring = sweep_eval_config(eval_cfg, sweep)
    rows = []
    runs = list(seed_runs(points, sweep.validation_seeds))
    for point, seed, student in tqdm(runs, desc=f"sweep {family_name}", disable=not progress):
        name = point.run_name(seed)
        train(name, student, point.train_cfg, toy, checkpoint_root, progress=False)
        trained = load(name, student, point.train_cfg, toy, checkpoint_root)
        for row in evaluate(trained, teacher, scoring):
            rows.append({"value": value_label(point.value), "ma": point.ma, "seed": seed, **row})
    return pd.DataFrame(rows)


def family_metrics(family_name: str, family: SweepFamily, sweep: SweepConfig, runs: pd.DataFrame) -> dict:
    """The family's ``metrics.json``: what was swept, on which seeds and samples, and the cells."""
    return {"family": family_name, "student": family.student, "parameter": family.parameter,
            "description": OVERRIDES[family.parameter], "fixed": family.fixed,
            "values": [value_label(v) for v in family.values], "baseline": family.baseline,
            "split": "validation", "seeds": list(sweep.validation_seeds), "n_samples": sweep.n_samples,
            "interval": f"{sweep.level:.0%} Student-t half-width over {len(sweep.validation_seeds)} seeds",
            "rows": aggregate(runs, sweep.level)}


def narrowed(sweep_params: dict[str, Any], family_name: str) -> dict[str, Any]:
    """The raw ``toy2d_sweep`` section with one family left: what the family's stage reads."""
    families = sweep_params.get("families", {})
    if family_name not in families:
        raise ConfigError(f"toy2d_sweep.families.{family_name}: missing; the stage "
                          f"toy2d_sweep@{family_name} sweeps it (families given: {sorted(families)})")
    return {**sweep_params, "families": {family_name: families[family_name]}}


def point_settings(point: Point) -> dict[str, Any]:
    """What a point trains with, for the notebook's table of points."""
    ma = point.student.ma_config(point.train_cfg.ma)
    return {"label": point.label, "ma": point.ma, "windows": point.student.windows,
            "teacher_steps": point.train_cfg.perflow.teacher_steps,
            **({f"ma.{k}": v for k, v in asdict(ma).items()
                if k in ("weight", "substeps", "logdet", "divergence", "window_weights")} if ma else {})}
