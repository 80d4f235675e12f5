"""``headline.json``: the flat, named numbers of every tier, for ``dvc metrics show`` / ``diff``.

A key is ``<tier>.<metric>.<row>.nfe<N>.<stat>`` (``toy2d.kl.perflow_ma.nfe4.mean``,
``images.domain_fd_teacher.perflow.nfe8.ci95``) or ``<tier>.delta.<metric>.<comparison>.nfe<N>.<stat>``
for a paired test (``images.delta.kl.perflow_ma_vs_perflow.nfe4.p_holm``); names are lower-cased
with every other character an underscore (``teacher (Euler)`` -> ``teacher_euler``,
``perflow_ma - perflow`` -> ``perflow_ma_vs_perflow``). Only finite numbers: a missing or NaN value
and every string (a verdict, a status) is left out. Which metrics and NFE are flattened is the
``report`` params section. One function per input (``FLATTENERS``); an absent input adds nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .config import ReportConfig
from .inputs import FILES, Inputs, ReportInputError, need
from .numbers import is_number


def key_part(name: Any) -> str:
    """A name as one dot-free key component (module doc)."""
    text = str(name).strip().lower().replace(" - ", "_vs_")
    text = re.sub(r"[^a-z0-9_]+", "_", text)
    return re.sub(r"_+", "_", text).strip("_") or "_"


class Flat:
    """A flat mapping that refuses two numbers under one key (two names that sanitize alike)."""

    def __init__(self) -> None:
        self.values: dict[str, float | int] = {}

    def put(self, value: Any, *parts: Any) -> None:
        if not is_number(value):
            return
        key = ".".join(parts[:1] + tuple(key_part(p) for p in parts[1:]))
        if key in self.values:
            raise ReportInputError(f"headline key {key!r} is produced twice (two rows whose names differ only "
                                   f"in punctuation?)")
        self.values[key] = int(value) if isinstance(value, int) else float(value)


def _rows(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    rows = need(data, key, where)
    if not isinstance(rows, list):
        raise ReportInputError(f"{where}: {key!r} must be a list of rows")
    return rows


def _check_columns(rows: list[dict[str, Any]], metrics: list[str], setting: str, where: str) -> None:
    """Every configured metric is a column of ``rows`` (a typo in params would drop it silently)."""
    columns = {k for r in rows for k in r}
    for i, metric in enumerate(metrics):
        if rows and metric not in columns:
            raise ReportInputError(f"report.{setting}[{i}] = {metric!r}: no such column in {where} "
                                   f"(columns: {sorted(columns)})")


def toy2d_fig1(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.<metric>.<student>.nfe<N>.mean`` / ``.se`` from the fig1 table (one training seed;
    the SE is the Monte-Carlo one)."""
    data = inputs.get("fig1")
    if data is None:
        return
    _student_metrics(flat, _rows(data, "table", FILES["fig1"]), cfg, "toy2d", "se", f"{FILES['fig1']} table")


def _student_metrics(flat: Flat, rows: list[dict[str, Any]], cfg: ReportConfig, prefix: str, error: str,
                     where: str) -> None:
    """``<prefix>.<metric>.<student>.nfe<N>.mean`` and ``.<error>`` (the row's ``<metric>_<error>``)
    for the headline metrics and NFE of ``cfg``."""
    _check_columns(rows, cfg.toy2d_metrics, "toy2d_metrics", where)
    for row in (r for r in rows if r.get("nfe") in cfg.nfe):
        for metric in cfg.toy2d_metrics:
            flat.put(row.get(metric), prefix, metric, row["student"], f"nfe{row['nfe']}", "mean")
            flat.put(row.get(f"{metric}_{error}"), prefix, metric, row["student"], f"nfe{row['nfe']}", error)


TV_BOUND_TERMS = ("final_tv", "sum_local_tv", "pinsker_local_kl")


def toy2d_tv_bound(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.tv_bound.<student>.<term>.mean`` / ``.se``: the final TV and its two bounds."""
    data = inputs.get("tv_bound")
    if data is None:
        return
    for row in _rows(data, "summary", FILES["tv_bound"]):
        for term in TV_BOUND_TERMS:
            flat.put(row.get(term), "toy2d", "tv_bound", row["student"], term, "mean")
            flat.put(row.get(f"{term}_se"), "toy2d", "tv_bound", row["student"], term, "se")


def toy2d_underdetermination(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.underdetermination.closest_pair.*`` (the KL ratio of two students with equal TM
    loss, and their TM gap in paired SEs) and ``...analytic.<map>.kl`` / ``.matching_error``."""
    data = inputs.get("underdetermination")
    if data is None:
        return
    pair = data.get("closest_pair") or {}
    for name in ("kl_ratio", "tm_gap_in_paired_se"):
        flat.put(pair.get(name), "toy2d", "underdetermination", "closest_pair", name)
    for row in data.get("analytic") or []:
        for name in ("kl", "matching_error"):
            flat.put(row.get(name), "toy2d", "underdetermination", "analytic", row["student"], name)


def toy2d_test(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.test.<metric>.<student>.nfe<N>.mean`` / ``.hw`` (the held-out test seeds) and the
    test's paired comparisons ``toy2d.test.delta.<metric>.<comparison>.nfe<N>.delta`` / ``.p_holm``
    / ``.mde``."""
    data = inputs.get("test")
    if data is None:
        return
    _student_metrics(flat, _rows(data, "rows", FILES["test"]), cfg, "toy2d.test", "hw", f"{FILES['test']} rows")
    for test in data.get("comparisons") or []:
        for stat in ("delta", "p_holm", "mde"):
            flat.put(test.get(stat), "toy2d.test.delta", test["metric"], test["comparison"], f"nfe{test['nfe']}", stat)


def toy2d_selection(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.selection.<student>.<parameter>.value`` / ``.score``: the chosen hyper-parameters."""
    data = inputs.get("test")  # the test stage records what it selected, and on which seeds
    if data is None:
        return
    for row in _rows(data, "selected", FILES["test"]):
        value = row.get("value")
        try:  # a grid label ("0.3") is a number; a word ("continuous") is no metric
            value = float(value)
        except (TypeError, ValueError):
            value = None
        flat.put(value, "toy2d.selection", row["student"], row["parameter"], "value")
        flat.put(row.get("score"), "toy2d.selection", row["student"], row["parameter"], "score")


def _kl_and_cost(inputs: Inputs, cfg: ReportConfig, flat: Flat, name: str, key: str, costs: tuple[str, ...]) -> None:
    """``toy2d.<name>.kl.<row key>.nfe<N>.mean`` / ``.hw`` (one metric per row and NFE: the stage's
    own files carry the rest) and each row's counted ``costs`` once (they do not depend on the NFE)."""
    data = inputs.get(name)
    if data is None:
        return
    costed = set()
    for row in (r for r in _rows(data, "rows", FILES[name]) if r.get("nfe") in cfg.nfe):
        nfe = f"nfe{row['nfe']}"
        flat.put(row.get("kl"), f"toy2d.{name}", "kl", row[key], nfe, "mean")
        flat.put(row.get("kl_hw"), f"toy2d.{name}", "kl", row[key], nfe, "hw")
        if row[key] not in costed:
            costed.add(row[key])
            for cost in costs:
                flat.put(row.get(cost), f"toy2d.{name}", cost, row[key])


def toy2d_ablation(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.ablation.kl.<variant>.nfe<N>.mean`` / ``.hw`` and the counted cost per step
    ``toy2d.ablation.mflops_per_step.<variant>`` / ``saved_mib_per_step`` (one per variant)."""
    _kl_and_cost(inputs, cfg, flat, "ablation", "variant", ("mflops_per_step", "saved_mib_per_step"))


def toy2d_related(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.related.kl.<method>.nfe<N>.mean`` / ``.hw`` and each method's counted training cost
    ``toy2d.related.mflops_per_step.<method>`` (LFM and flow-map rows, test seeds)."""
    _kl_and_cost(inputs, cfg, flat, "related", "method", ("mflops_per_step",))


def toy2d_sweeps(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``toy2d.sweep.<family>.<metric>.v<value>.nfe<N>.mean`` / ``.hw`` (validation seeds); a no-MA
    twin's value is ``v<value>_noma``."""
    for family, sweep in inputs.sweeps.items():
        if sweep.data is None:
            continue
        for row in (r for r in _rows(sweep.data, "rows", sweep.path) if r.get("nfe") in cfg.nfe):
            value = f"v{row['value']}" + ("" if row.get("ma", True) else "_noma")
            for metric in cfg.toy2d_metrics:
                flat.put(row.get(metric), "toy2d.sweep", family, metric, value, f"nfe{row['nfe']}", "mean")
                flat.put(row.get(f"{metric}_hw"), "toy2d.sweep", family, metric, value, f"nfe{row['nfe']}", "hw")


def images_summary(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``images.<metric>.<method>.nfe<N>.mean`` / ``.ci95`` / ``.seeds`` from the table's summary
    (mean over training seeds, 95% Student-t half-width, seed count)."""
    data = inputs.get("images_table")
    if data is None:
        return
    rows = _rows(data, "summary", FILES["images_table"])
    _check_columns(rows, cfg.images_metrics, "images_metrics", f"{FILES['images_table']} summary")
    for row in (r for r in rows if r.get("nfe") in cfg.nfe):
        nfe = f"nfe{row['nfe']}"
        for metric in cfg.images_metrics:
            if not is_number(row.get(metric)):
                continue
            flat.put(row[metric], "images", metric, row["method"], nfe, "mean")
            flat.put(row.get(f"{metric}_ci95"), "images", metric, row["method"], nfe, "ci95")
            seeds = row.get(f"{metric}_seeds")
            flat.put(int(seeds) if is_number(seeds) and float(seeds).is_integer() else seeds,
                     "images", metric, row["method"], nfe, "seeds")


def images_deltas(inputs: Inputs, cfg: ReportConfig, flat: Flat) -> None:
    """``images.delta.<metric>.<comparison>.nfe<N>.delta`` / ``.p_holm`` / ``.mde``: the paired,
    Holm-corrected MA deltas of the headline metrics (the verdicts are words: REPORT.md has them)."""
    data = inputs.get("images_table")
    if data is None:
        return
    for test in _rows(data, "paired_tests_holm", FILES["images_table"]):
        if test.get("metric") not in cfg.images_metrics or test.get("nfe") not in cfg.nfe:
            continue
        for stat in ("delta", "p_holm", "mde"):
            flat.put(test.get(stat), "images.delta", test["metric"], test["comparison"], f"nfe{test['nfe']}", stat)


Flattener = Callable[[Inputs, ReportConfig, Flat], None]
#: the sweep families are not headline numbers (hundreds of cells; each family's own metrics file and
#: ``curve.csv`` plot carry them in DVC): ``toy2d_sweeps`` flattens them for whoever wants them flat
FLATTENERS: tuple[Flattener, ...] = (toy2d_fig1, toy2d_tv_bound, toy2d_underdetermination,
                                     toy2d_selection, toy2d_test, toy2d_ablation, toy2d_related, images_summary,
                                     images_deltas)


def headline(inputs: Inputs, cfg: ReportConfig) -> dict[str, float | int]:
    """Every flattened number, keys sorted."""
    flat = Flat()
    for flatten in FLATTENERS:
        flatten(inputs, cfg, flat)
    return dict(sorted(flat.values.items()))
