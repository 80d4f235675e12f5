"""The image tier's main table: sample sets per (method, seed, NFE), their metrics, seed intervals,
and the +MA deltas paired by seed.

A *row* is one sample set: ``method`` (a student name, ``teacher``, ``train real`` or ``noise``),
``seed`` (training seed; -1 where none), ``nfe`` (network evaluations per sample; the adaptive
teacher's mean NFE) and the metric columns. Each training seed has its own noise draw (shared by
the students of that seed), so intervals over seeds cover training and evaluation noise; the
reference sets are shared by every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ..common.stats import Interval, paired_delta, seed_interval

#: metric columns: (column, label, lower is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("fid", "FID (Inception)", True),
    ("kid", "KID (Inception)", True),
    ("precision", "precision", False),
    ("recall", "recall", False),
    ("domain_fd", "domain FD (classifier; not Inception FID)", True),
    ("domain_precision", "domain precision", False),
    ("domain_recall", "domain recall", False),
    ("domain_fd_teacher", "domain FD to the teacher's samples", True),
    ("domain_kid_teacher", "domain KID to the teacher's samples", True),
    ("domain_precision_teacher", "domain precision vs teacher", False),
    ("domain_recall_teacher", "domain recall vs teacher (coverage)", False),
    ("class_mass_error", "class-mass TV", True),
    ("class_coverage", "least-covered class's mass / its share", False),
    ("kl", "KL(student || teacher), nats", True),
    ("kl_fold_fraction", "KL samples with a fold (det(I + hJ) <= 0: their log q is a lower bound)", True),
)

#: the metrics with the power to decide at the default sizes (the pre-declared family of paired tests,
#: Holm-corrected together): the mode-seeking KL beside the coverage metrics and the domain FD to the
#: teacher's samples; the others are shown with uncorrected intervals as secondary
HEADLINE: tuple[str, ...] = ("kl", "domain_fd_teacher", "domain_recall_teacher", "class_mass_error")


def mark_off_design(rows: pd.DataFrame, windows: dict[str, int]) -> pd.DataFrame:
    """``rows`` with ``fewer_steps_than_windows``: a student sampled with fewer steps than it has
    windows (``nfe < K``) runs a sampler outside its design (a step crosses window boundaries), as
    the 2-D table marks; ``windows`` maps student names to ``K`` (other rows: False)."""
    out = rows.copy()
    out["fewer_steps_than_windows"] = [bool(m in windows and n < windows[m])
                                       for m, n in zip(out.method, out.nfe, strict=True)]
    return out


def aggregate(rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One line per (method, nfe): for each metric its seed mean, 95% t half-width and seed count."""
    out = []
    for (method, nfe), group in rows.groupby(["method", "nfe"], sort=False):
        line: dict = {"method": method, "nfe": nfe}
        for metric in metrics:
            values = group[metric].dropna().tolist() if metric in group else []
            if values:
                iv = seed_interval(values)
                line |= {metric: iv.mean, f"{metric}_ci95": iv.half_width, f"{metric}_seeds": iv.n}
        out.append(line)
    return pd.DataFrame(out)


def formatted(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """``mean ± half-width`` strings (``(1 seed)`` where there is one) for display."""
    table = summary[["method", "nfe"]].copy()
    for metric in metrics:
        if metric not in summary:
            continue
        table[metric] = [
            "" if pd.isna(m) else str(Interval(m, h, int(n)))
            for m, h, n in zip(summary[metric], summary.get(f"{metric}_ci95"),
                               summary.get(f"{metric}_seeds").fillna(0), strict=True)]
    return table


def ma_deltas(rows: pd.DataFrame, treated: str, control: str, metrics: Sequence[str]) -> pd.DataFrame:
    """``treated - control`` per NFE and metric, paired by training seed, with 95% t intervals (not
    corrected for the number of tests: see ``corrected``) and the per-seed ``differences``."""
    out = []
    for nfe in sorted(set(rows.loc[rows.method == treated, "nfe"]) & set(rows.loc[rows.method == control, "nfe"])):
        for metric in metrics:
            if metric not in rows:
                continue
            a, b = (_by_seed(rows, method, nfe, metric) for method in (treated, control))
            if set(a) & set(b):
                iv = paired_delta(a, b)
                common = sorted(set(a) & set(b))
                out.append({"nfe": nfe, "metric": metric, "delta": iv.mean, "ci95": iv.half_width,
                            "seeds": iv.n, "verdict": verdict(iv, lower_is_better(metric)),
                            "differences": [a[s] - b[s] for s in common]})
    return pd.DataFrame(out)


def corrected(deltas: pd.DataFrame, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """``deltas`` (``ma_deltas`` rows of one or more comparisons: one family) with, per test, the
    paired t-test ``p_value``, its Holm-adjusted ``p_holm`` over the whole family, the
    ``mde`` (the smallest true delta detected with ``power`` at the family's first-test level
    ``alpha / m``) and ``verdict_holm``: ``MA better`` / ``MA worse`` where ``p_holm <= alpha``,
    else ``not detected (MDE ...)``. Rows with fewer than two seeds, or whose differences have no
    spread (a t-test is undefined there: identical differences of a quantized metric, say), are left
    untested."""
    from ..common.testing import holm, minimum_detectable_effect, paired_test

    out = deltas.copy()
    candidates = {i: paired_test(d) for i, d in enumerate(out.differences) if len(d) >= 2}
    tests = {i: t for i, t in candidates.items() if t.sd > 0}
    tested = sorted(tests)
    adjusted = dict(zip(tested, holm([tests[i].p_value for i in tested]), strict=True))
    m = max(len(tested), 1)
    out["p_value"] = [tests[i].p_value if i in tests else None for i in range(len(out))]
    out["p_holm"] = [adjusted.get(i) for i in range(len(out))]
    out["mde"] = [minimum_detectable_effect(tests[i].sd, tests[i].n, alpha / m, power) if i in tests else None
                  for i in range(len(out))]
    verdicts = []
    for i, row in enumerate(out.itertuples()):
        if i in candidates and i not in tests:
            verdicts.append("no spread: untested")
        elif i not in tests:
            verdicts.append("one seed: untested")
        elif adjusted[i] <= alpha:
            better = (tests[i].mean < 0) == lower_is_better(row.metric)
            verdicts.append("MA better" if better else "MA worse")
        else:
            verdicts.append(f"not detected (MDE {out.mde.iloc[i]:.3g})")
    out["verdict_holm"] = verdicts
    return out


def _by_seed(rows: pd.DataFrame, method: str, nfe: int, metric: str) -> dict[int, float]:
    part = rows[(rows.method == method) & (rows.nfe == nfe)].dropna(subset=[metric])
    return dict(zip(part.seed, part[metric], strict=True))


def lower_is_better(metric: str) -> bool:
    return next(lower for name, _, lower in METRICS if name == metric)


def verdict(delta: Interval, lower_better: bool) -> str:
    """``MA better`` / ``MA worse`` when the 95% interval excludes 0, else ``no difference shown``."""
    if delta.n < 2 or pd.isna(delta.half_width):
        return "one seed: no interval"
    if abs(delta.mean) <= delta.half_width:
        return "no difference shown"
    better = (delta.mean < 0) == lower_better
    return "MA better" if better else "MA worse"
