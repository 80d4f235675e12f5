"""The image tier's results in words and one table, generated from the table stage's frames, so that
no sentence about a result is written by hand (``table_images`` writes ``summary.md``; the README
carries a copy that ``tests/test_docs.py`` checks against it).

Inputs are the frames of ``replication.images.table``: ``summary`` (``aggregate``), ``family``
(``corrected`` over the ``HEADLINE`` metrics) and the per-set ``rows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from .table import HEADLINE, METRICS

#: a student "collapses" at an NFE when its samples cover less than this fraction of the teacher's
#: (domain recall against the teacher's samples) or leave a class below this fraction of its share
COLLAPSE_BELOW = 0.1

_LABELS = {m: label for m, label, _ in METRICS}
_SHOWN = ("kl", "kl_fold_fraction", "domain_fd_teacher", "domain_recall_teacher", "class_mass_error",
          "class_coverage", "domain_fd", "fid", "recall")


def _cell(summary_row: pd.Series, metric: str) -> str:
    mean = summary_row.get(metric)
    if mean is None or pd.isna(mean):
        return ""
    half = summary_row.get(f"{metric}_ci95")
    digits = 3 if abs(mean) < 10 else 1
    if half is None or pd.isna(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def results_table(summary: pd.DataFrame, rows: pd.DataFrame, metrics: Sequence[str] = _SHOWN) -> str:
    """Markdown table: one line per (method, NFE), seed mean ± 95% t half-width; ``*`` marks a
    sampler with fewer steps than its student's windows (outside the method's design)."""
    metrics = [m for m in metrics if m in summary]
    off = {(m, n) for m, n, f in zip(rows.method, rows.nfe, rows.get("fewer_steps_than_windows",
                                                                     [False] * len(rows)), strict=True) if f}
    head = "| method | NFE | seeds | " + " | ".join(metrics) + " |"
    lines = [head, "|:--|--:|--:|" + "--:|" * len(metrics)]
    for _, line in summary.iterrows():
        seeds = max((int(line[f"{m}_seeds"]) for m in metrics if not pd.isna(line.get(f"{m}_seeds"))),
                    default=0)
        nfe = f"{int(line.nfe)}{'*' if (line.method, line.nfe) in off else ''}"
        lines.append(f"| {line.method} | {nfe} | {seeds} | "
                     + " | ".join(_cell(line, m) for m in metrics) + " |")
    return "\n".join(lines)


def estimator_sentence(rows: pd.DataFrame, teacher_steps: int, refined_steps: int) -> str:
    """How far the KL estimator's sanity row (the teacher against its own CNF) is from 0."""
    row = rows[rows.method == "teacher (CNF)"]
    if row.empty:
        return "The KL estimator's sanity row was not computed."
    r = row.iloc[0]
    z = r.kl / r.kl_stderr

    def verdict(z: float) -> str:
        return "within 2 standard errors of 0" if abs(z) <= 2 else f"{abs(z):.1f} standard errors from 0"

    text = (f"KL estimator check: the teacher's own samples scored by its own CNF give "
            f"{r.kl:.2f} ± {r.kl_stderr:.2f} nats (estimate ± 1 SE) with {teacher_steps} RK4 steps, "
            f"{verdict(z)}")
    if "kl_refined" in row and not pd.isna(r.get("kl_refined")):
        zr = r.kl_refined / r.kl_refined_stderr
        text += (f"; {r.kl_refined:.2f} ± {r.kl_refined_stderr:.2f} with {refined_steps} steps, "
                 f"{verdict(zr)}")
    return text + "."


def verdict_sentences(family: pd.DataFrame, comparison: str, nfes: Sequence[int]) -> list[str]:
    """One sentence per NFE: which headline metrics show MA better / worse after Holm, which detect
    nothing (with the minimum detectable effect), from ``family`` (``corrected`` rows)."""
    part = family[family.comparison == comparison] if "comparison" in family else family
    out = []
    for nfe in nfes:
        rows = part[(part.nfe == nfe) & part.metric.isin(HEADLINE)]
        if rows.empty:
            continue
        groups: dict[str, list[str]] = {"MA better": [], "MA worse": [], "not detected": []}
        for r in rows.itertuples():
            if r.verdict_holm in ("MA better", "MA worse"):
                groups[r.verdict_holm].append(f"{r.metric} ({r.delta:+.3g}, Holm p {r.p_holm:.2g})")
            elif isinstance(r.mde, float) and not math.isnan(r.mde):
                groups["not detected"].append(f"{r.metric} ({r.delta:+.3g}, MDE {r.mde:.3g})")
            else:
                groups["not detected"].append(f"{r.metric} ({r.verdict_holm})")
        parts = [f"{key}: {', '.join(items)}" for key, items in groups.items() if items]
        if groups["MA better"] and not groups["MA worse"]:
            head = "MA helps"
        elif groups["MA worse"] and not groups["MA better"]:
            head = "MA hurts"
        elif groups["MA better"]:
            head = "mixed"
        else:
            head = "no effect detected"
        out.append(f"{nfe} NFE: **{head}**; " + "; ".join(parts) + ".")
    return out


def collapse_sentence(summary: pd.DataFrame, student: str, baseline: str) -> str:
    """Whether ``student`` collapses (``COLLAPSE_BELOW``) at each NFE, beside ``baseline``."""
    def values(method: str) -> dict[int, tuple[float, float]]:
        part = summary[summary.method == method]
        return {int(r.nfe): (r.get("domain_recall_teacher", float("nan")), r.get("class_coverage", float("nan")))
                for _, r in part.iterrows()}

    a, b = values(student), values(baseline)
    if not a:
        return f"{student} was not evaluated."
    cells, collapsed = [], []
    for nfe in sorted(a):
        recall, coverage = a[nfe]
        base = b.get(nfe, (float("nan"), float("nan")))
        cells.append(f"{nfe} NFE recall {recall:.2f} (vs {base[0]:.2f}), least class {coverage:.2f} "
                     f"(vs {base[1]:.2f})")
        if recall < COLLAPSE_BELOW or coverage < COLLAPSE_BELOW:
            collapsed.append(nfe)
    head = (f"{student} collapses at {', '.join(map(str, collapsed))} NFE" if collapsed
            else f"{student} does not collapse at any NFE")
    return (f"{head} (collapse: domain recall against the teacher's samples or the least-covered "
            f"class's mass share below {COLLAPSE_BELOW}; {baseline} beside it): " + "; ".join(cells) + ".")


def summary_markdown(summary: pd.DataFrame, rows: pd.DataFrame, family: pd.DataFrame, counts: dict,
                     teacher_steps: int, refined_steps: int, nfes: Sequence[int]) -> str:
    """The whole ``summary.md``: counts, the table, the estimator check, the verdicts."""
    tested = int(family.p_value.notna().sum())
    seeds = sorted({n for n in family.seeds if n >= 2})
    lines = [
        "Generated by `notebooks/table_images.py` from `metrics.json`; do not edit by hand.",
        "",
        f"Sample counts per cell: {counts['domain_samples']} for the domain metrics and class masses "
        f"(against {counts['reference_images']} held-out images and {counts['teacher_reference_samples']} "
        f"teacher samples), {counts['inception_samples']} for the Inception FID / recall (a biased "
        f"ranking at this count, never comparable with published FIDs), {counts['kl_samples']} for the KL. "
        f"Mean over training seeds ± 95% Student-t half-width; each seed has its own evaluation noise. "
        f"`*`: fewer steps than windows (outside PeRFlow's design).",
        "",
        results_table(summary, rows),
        "",
        estimator_sentence(rows, teacher_steps, refined_steps),
        "",
        f"**Does MA help PeRFlow?** PeRFlow + MA - PeRFlow, paired by seed ({', '.join(map(str, seeds))} "
        f"seeds), {tested} paired t-tests over the headline metrics ({', '.join(HEADLINE)}) and NFE, "
        f"Holm-corrected together at level 0.05; MDE: the smallest true delta detected with power 0.8.",
        "",
        *[f"- {s}" for s in verdict_sentences(family, "perflow_ma - perflow", nfes)],
        "",
        collapse_sentence(summary, "reflow_ma", "reflow"),
    ]
    return "\n".join(lines) + "\n"
