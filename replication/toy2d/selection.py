"""Honest selection of tuned values, and the test-seed comparison of the tuned students.

A tuned setting (the MA weight ``lambda`` of a student, say) is chosen by ``select_value`` from a
sweep family's metrics, which hold **validation** seeds only (``toy2d_sweep.validation_seeds``);
the selection refuses anything else, and it never sees a test seed: the students it picks are then
trained afresh on ``toy2d_sweep.test_seeds`` and reported there (``compare_students``).

The rule (``SelectionRule``): among the family's MA points at ``nfe`` whose metric is defined on
every seed (no folded map) and whose value is not excluded (``0`` = MA off, when the question is
the best MA setting), the value with the lowest mean ``metric`` over the validation seeds; ties go
to the first in grid order. The runner-up and whether it lies within the winner's interval are
reported too: a selection inside the noise is a choice, not a finding; so is a value at the edge of
its grid (``on_grid_edge``: the optimum may lie beyond it).

The test comparison: ``treated - control`` paired by test seed for every metric of ``metrics`` and
every NFE, one family of tests Holm-corrected together (``replication.common.testing``), each with
its minimum detectable effect at the family's most demanding level ``alpha / m``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from ..common.students import StudentSpec
from ..common.testing import holm, minimum_detectable_effect, paired_test
from ..config import require
from .config import TrainStageConfig
from .sweep import SweepFamily, _set, value_label


class SelectionError(ValueError):
    """Selection asked to read something other than validation-seed sweep metrics."""


@dataclass
class SelectionRule:
    """How student ``student``'s setting is chosen: from sweep ``family``, the value minimising the
    validation mean of ``metric`` at ``nfe``, over the grid less ``exclude``."""

    family: str
    nfe: int
    metric: str = "kl"
    exclude: list[Any] = field(default_factory=list)

    def validate(self, where: str) -> None:
        require(self.metric in ("kl", "tv", "mode_mass_error", "sliced_w2"), f"{where}.metric", self.metric,
                "one of kl, tv, mode_mass_error, sliced_w2 (lower is better)")
        require(self.nfe >= 1, f"{where}.nfe", self.nfe, "must be >= 1")


@dataclass
class TestConfig:
    """The ``toy2d_test`` section: which students' settings are tuned (``select``: student -> rule),
    the ``compare`` pairs ``[treated, control]``, the tested metrics and the test level."""

    select: dict[str, SelectionRule] = field(default_factory=dict)
    compare: list[list[str]] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["kl", "tv", "mode_mass_error"])
    alpha: float = 0.05
    power: float = 0.8

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.compare):
            require(len(pair) == 2 and pair[0] != pair[1], f"{where}.compare[{i}]", pair,
                    "a pair [treated, control] of two students")
        require(0 < self.alpha < 1, f"{where}.alpha", self.alpha, "a level in (0, 1)")
        require(0 < self.power < 1, f"{where}.power", self.power, "a power in (0, 1)")
        require(len(self.metrics) >= 1, f"{where}.metrics", self.metrics, "list at least one metric")


@dataclass(frozen=True)
class Selection:
    """A chosen value and how it was chosen (``grid``, ``criterion``, ``score``, the runner-up)."""

    student: str
    family: str
    parameter: str
    grid: list[str]
    value: str
    criterion: str
    score: float
    score_hw: float | None
    runner_up: str | None
    runner_up_score: float | None
    within_interval: bool | None
    seeds: list[int]
    on_grid_edge: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def select_value(student: str, rule: SelectionRule, family_metrics: dict[str, Any],
                 test_seeds: list[int]) -> Selection:
    """The value of ``rule.family`` that ``rule`` picks from its validation metrics (module doc).

    Raises ``SelectionError`` when ``family_metrics`` are not a validation split, or share a seed
    with ``test_seeds``; ``ValueError`` when no point is eligible."""
    if family_metrics.get("split") != "validation":
        raise SelectionError(f"family {rule.family}: split is {family_metrics.get('split')!r}; a tuned "
                             f"value is chosen on validation seeds only")
    shared = sorted(set(family_metrics.get("seeds", [])) & set(test_seeds))
    if shared:
        raise SelectionError(f"family {rule.family}: seeds {shared} are test seeds; selecting on them "
                             f"would report a tuned value on the seeds it was tuned on")
    excluded = {value_label(v) for v in rule.exclude}
    cells = [r for r in family_metrics["rows"]
             if r["ma"] and r["nfe"] == rule.nfe and r["status"] == "ok" and r.get(rule.metric) is not None
             and math.isfinite(r[rule.metric]) and r["value"] not in excluded]
    if not cells:
        raise ValueError(f"family {rule.family}: no eligible point at {rule.nfe} NFE (every point excluded, "
                         f"folded or undefined)")
    order = {v: i for i, v in enumerate(family_metrics["values"])}
    ranked = sorted(cells, key=lambda r: (r[rule.metric], order.get(r["value"], 0)))
    best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    hw = best.get(f"{rule.metric}_hw")
    within = None if second is None or hw is None else bool(second[rule.metric] <= best[rule.metric] + hw)
    eligible = [v for v in family_metrics["values"] if v not in excluded]
    edge = len(eligible) > 2 and best["value"] in (eligible[0], eligible[-1])
    return Selection(student, rule.family, family_metrics["parameter"], list(family_metrics["values"]),
                     best["value"], f"lowest mean validation {rule.metric} at {rule.nfe} NFE"
                     + (f" (excluding {sorted(excluded)})" if excluded else ""),
                     best[rule.metric], hw, None if second is None else second["value"],
                     None if second is None else second[rule.metric], within,
                     list(family_metrics["seeds"]), edge)


def selected_student(base: StudentSpec, train_cfg: TrainStageConfig, family: SweepFamily,
                     value: Any) -> tuple[TrainStageConfig, StudentSpec]:
    """``(train_cfg, student)`` of ``base`` with the family's fixed settings and the chosen value."""
    cfg, student = train_cfg, base
    for key, v in {**family.fixed, family.parameter: value}.items():
        cfg, student = _set(cfg, student, key, v)
    return cfg, student


def grid_value(family: SweepFamily, label: str) -> Any:
    """The grid entry of ``family`` whose label is ``label``."""
    for value in family.values:
        if value_label(value) == label:
            return value
    raise ValueError(f"{label!r} is not in the grid {family.values}")


#: the metrics compared on the test seeds, each lower-is-better
LOWER_IS_BETTER: frozenset[str] = frozenset({"kl", "tv", "mode_mass_error", "off_mode", "sliced_w2", "mmd2"})


def compare_students(runs: pd.DataFrame, pairs: list[list[str]], metrics: list[str], alpha: float,
                     power: float) -> list[dict[str, Any]]:
    """Paired tests of ``treated - control`` over the test seeds (``runs``: one row per student, seed
    and NFE); every pair x metric x NFE cell is one test of one Holm family. A cell where either side
    has an undefined metric on some seed (a folded map) is not tested and says so."""
    cells = []
    for treated, control in pairs:
        for nfe in sorted(runs["nfe"].unique()):
            a = runs[(runs["student"] == treated) & (runs["nfe"] == nfe)].set_index("seed")
            b = runs[(runs["student"] == control) & (runs["nfe"] == nfe)].set_index("seed")
            seeds = sorted(set(a.index) & set(b.index))
            for metric in metrics:
                diffs = [float(a.loc[s, metric]) - float(b.loc[s, metric]) for s in seeds]
                cell = {"comparison": f"{treated} - {control}", "treated": treated, "control": control,
                        "metric": metric, "nfe": int(nfe), "seeds": len(seeds),
                        "outside_design": bool(a["crosses_windows"].any() or b["crosses_windows"].any())}
                if len(seeds) < 2 or not all(math.isfinite(d) for d in diffs):
                    cell.update(delta=None, p_value=None, untested="folded map on some seed: metric undefined"
                                if len(seeds) >= 2 else "fewer than 2 paired seeds")
                elif paired_test(diffs).sd == 0.0:  # a t-test of identical differences means nothing
                    cell.update(delta=diffs[0], p_value=None, untested="no spread between seeds")
                else:
                    test = paired_test(diffs)
                    cell.update(delta=test.mean, sd=test.sd, p_value=test.p_value, differences=diffs)
                cells.append(cell)
    tested = [c for c in cells if c["p_value"] is not None]
    adjusted = holm([c["p_value"] for c in tested])
    m = max(len(tested), 1)
    for cell, q in zip(tested, adjusted, strict=True):
        cell["p_holm"] = q
        cell["mde"] = minimum_detectable_effect(cell["sd"], cell["seeds"], alpha / m, power)
        better = cell["delta"] < 0 if cell["metric"] in LOWER_IS_BETTER else cell["delta"] > 0
        cell["verdict"] = ("treated better" if better else "treated worse") if q <= alpha else "no difference shown"
    for cell in cells:
        cell.setdefault("verdict", "untested: " + cell.get("untested", ""))
    return cells


def verdict_sentences(comparisons: list[dict[str, Any]], alpha: float) -> list[str]:
    """One generated sentence per comparison and NFE, from the test cells (never typed)."""
    frame = pd.DataFrame(comparisons)
    m = int(frame["p_value"].notna().sum())
    lines = [f"Paired over test seeds; {m} tests Holm-corrected together at level {alpha:g}; MDE: the "
             f"smallest true delta detected with the stated power at level alpha / {m}."]
    for (comparison, nfe), group in frame.groupby(["comparison", "nfe"], sort=False):
        design = " (outside the design: fewer steps than windows)" if group["outside_design"].any() else ""
        parts = []
        for _, c in group.iterrows():
            if c["p_value"] is None or (isinstance(c["p_value"], float) and math.isnan(c["p_value"])):
                parts.append(f"{c['metric']} {c['verdict']}")
            elif c["verdict"] == "no difference shown":
                parts.append(f"{c['metric']} {c['delta']:+.3g} (MDE {c['mde']:.3g}, not detected)")
            else:
                parts.append(f"{c['metric']} {c['delta']:+.3g} (Holm p {c['p_holm']:.2g}: {c['verdict']})")
        lines.append(f"- {comparison}, {nfe} NFE{design}: " + "; ".join(parts) + ".")
    return lines


def tuned_students(train_cfg: TrainStageConfig, families: dict[str, SweepFamily],
                   selections: dict[str, Selection]) -> dict[str, tuple[TrainStageConfig, StudentSpec]]:
    """Every student of ``train_cfg`` as the test table trains it: a student with a selection gets
    its family's fixed settings and the selected value, the others are as written."""
    tuned = {}
    for name, base in train_cfg.students.items():
        if name in selections:
            family = families[selections[name].family]
            tuned[name] = selected_student(base, train_cfg, family, grid_value(family, selections[name].value))
        else:
            tuned[name] = (train_cfg, base)
    return tuned


def score_seeds(students: dict[str, tuple[TrainStageConfig, StudentSpec]], seeds: list[int], toy, eval_cfg,
                checkpoint_root, train, load, evaluate, teacher, progress: bool = True,
                terms: dict[str, str] | None = None) -> pd.DataFrame:
    """Train (or resume) every student on every seed into ``checkpoint_root/<student>/seed<s>`` and
    score it with ``evaluate``; one row per student, seed and NFE. ``terms``: a student's optimized
    loss terms where not the method's own (the tier's ``LOSS_TERMS``)."""
    from tqdm.auto import tqdm

    terms = terms or {}
    jobs = [(name, seed) for name in students for seed in seeds]
    rows = []
    for name, seed in tqdm(jobs, desc="students x seeds", disable=not progress):
        cfg, student = students[name]
        one = replace(student, seeds=[seed])
        run = f"{name}/seed{seed}"
        kind = terms.get(name, "tm+ma")
        train(run, one, cfg, toy, checkpoint_root, progress=False, terms=kind)
        trained = load(run, one, cfg, toy, checkpoint_root, terms=kind)
        rows += [{**row, "student": name, "seed": seed} for row in evaluate(trained, teacher, eval_cfg)]
    return pd.DataFrame(rows)
