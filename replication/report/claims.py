"""The abstract's claims (``paper.yaml`` ``claims``), each decided per tier from the metrics files by
a written rule: never a verdict typed in.

A verdict is one of ``supported``, ``not supported``, ``not testable here`` (the tier cannot test the
claim by its design) and ``not testable yet`` (the input that would test it has not been produced).
Each rule is a function below; its docstring is the rule, printed in the report. ``RULES`` maps a
claim id to its rule per tier; a claim of ``paper.yaml`` without one is reported as ``no rule``.

Shared definitions of the rules:

* a paired test is **in design** when neither student of the comparison was sampled with fewer
  steps than it has windows (PeRFlow's sampler takes at least one step per window); a test with no
  row telling is not in design;
* a test **says MA better** (or **worse**) when its metric is a quality metric of
  ``report.directions``, its Holm-corrected p-value is below ``report.alpha``, and its delta
  (treated minus control, ``report.ma_comparisons``) points the better (worse) way for that metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import ReportConfig
from .inputs import FILES, Inputs, need
from .numbers import fmt, is_number, published

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
NOT_HERE = "not testable here"
NOT_YET = "not testable yet"
NO_RULE = "no rule"
TIERS = ("toy2d", "images")


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict on one tier, why (with the input numbers that decided it) and the evidence
    (repository paths of the metrics files and notebooks)."""

    verdict: str
    reason: str
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairedTest:
    """One Holm-corrected paired comparison ``treated - control`` of ``metric`` at ``nfe``."""

    comparison: str
    metric: str
    nfe: int
    delta: float | None
    p_holm: float | None
    in_design: bool

    def label(self) -> str:
        return f"{self.metric} at NFE {self.nfe} ({self.comparison}: delta {fmt(self.delta)}, Holm p {fmt(self.p_holm)})"


def outcome(test: PairedTest, cfg: ReportConfig) -> str | None:
    """``"better"``, ``"worse"`` or None (not a quality metric, untested, or not significant)."""
    direction = cfg.directions.get(test.metric)
    if direction is None or not is_number(test.p_holm) or not is_number(test.delta):
        return None
    if test.p_holm >= cfg.alpha or test.delta == 0:
        return None
    lower_is_better = direction == "lower"
    return "better" if (test.delta < 0) == lower_is_better else "worse"


def judge_ma_tests(tests: list[PairedTest], cfg: ReportConfig, evidence: tuple[str, ...]) -> Verdict:
    """The MA rule on a list of paired tests (``ma_improves_marginal``)."""
    ma = {f"{t} - {c}" for t, c in cfg.treated_control()}
    counted = [t for t in tests if t.comparison in ma and t.metric in cfg.directions and t.in_design
               and is_number(t.p_holm)]
    if not counted:
        return Verdict(NOT_YET, "no Holm-tested MA comparison of a quality metric at an in-design NFE", evidence)
    better = [t for t in counted if outcome(t, cfg) == "better"]
    worse = [t for t in counted if outcome(t, cfg) == "worse"]
    outside = [t for t in tests if t.comparison in ma and not t.in_design and outcome(t, cfg)]
    parts = [f"MA better: {'; '.join(t.label() for t in better) or 'none'}",
             f"MA worse: {'; '.join(t.label() for t in worse) or 'none'}",
             "tested in design: " + ", ".join(f"{t.metric} at NFE {t.nfe}" for t in counted)]
    if outside:
        parts.append("not counted (outside the design): " + "; ".join(f"{outcome(t, cfg)}: {t.label()}"
                                                                       for t in outside))
    verdict = SUPPORTED if better and not worse else NOT_SUPPORTED
    return Verdict(verdict, ". ".join(parts), evidence)


def design_map(rows: list[dict[str, Any]], key_name: str, flag: str) -> dict[tuple[str, int], bool]:
    """``(student, nfe) -> in design`` from rows carrying ``flag`` (True: outside the design)."""
    out: dict[tuple[str, int], bool] = {}
    for row in rows:
        key = (row[key_name], row["nfe"])
        out[key] = out.get(key, True) and not bool(row.get(flag, True))
    return out


def paired_tests(raw: list[dict[str, Any]], design: dict[tuple[str, int], bool]) -> list[PairedTest]:
    tests = []
    for t in raw:
        treated, _, control = str(t["comparison"]).partition(" - ")
        inside = design.get((treated, t["nfe"]), False) and design.get((control, t["nfe"]), False)
        tests.append(PairedTest(t["comparison"], t["metric"], t["nfe"], t.get("delta"), t.get("p_holm"), inside))
    return tests


def ma_improves_marginal_toy2d(inputs: Inputs, cfg: ReportConfig) -> Verdict:
    """Supported iff some Holm-corrected paired test of the held-out test seeds
    (results/toy2d/test/metrics.json, comparisons) says MA better at an in-design NFE and none says
    MA worse at an in-design NFE; not supported iff such tests exist otherwise; not testable yet
    while the test file is absent or has no such test. (The fig1 table has one training seed: it
    shows MA's effect on that seed, not a test over seeds.) In design: the test rows'
    crosses_windows is false for both students."""
    return _ma_tests_verdict(inputs, cfg, "test", "notebooks/fig1_mog.py", "comparisons", "student",
                             "crosses_windows")


def _ma_tests_verdict(inputs: Inputs, cfg: ReportConfig, name: str, notebook: str, tests_key: str,
                      label_key: str, design_key: str) -> Verdict:
    """``judge_ma_tests`` on input ``name``'s paired tests (``tests_key``), in design where no row
    (labelled by ``label_key``) at that NFE has ``design_key`` set; not testable yet without the file."""
    evidence = (FILES[name], notebook)
    data = inputs.get(name)
    if data is None:
        return Verdict(NOT_YET, f"{FILES[name]}: {inputs.files[name].status}", evidence)
    design = design_map(need(data, "rows", FILES[name]), label_key, design_key)
    return judge_ma_tests(paired_tests(need(data, tests_key, FILES[name]), design), cfg, evidence)


def ma_improves_marginal_images(inputs: Inputs, cfg: ReportConfig) -> Verdict:
    """Supported iff some Holm-corrected paired test of the image table
    (results/images/table/metrics.json, paired_tests_holm) says MA better at an in-design NFE and
    none says MA worse at an in-design NFE; not supported iff such tests exist otherwise; not
    testable yet without such a test (one training seed gives no test). In design: no per-seed row
    of either student at that NFE has fewer_steps_than_windows."""
    return _ma_tests_verdict(inputs, cfg, "images_table", "notebooks/table_images.py", "paired_tests_holm",
                             "method", "fewer_steps_than_windows")


def tm_underdetermined_toy2d(inputs: Inputs, cfg: ReportConfig) -> Verdict:
    """Supported iff the under-determination stage's closest pair of trained students (two training
    snapshots) has trajectory-matching losses equal within its own tolerance (|tm_difference| at most
    within_se paired standard errors) while their KLs to the teacher differ by more than report.z
    combined standard errors, the smaller KL being exact (no folded samples: a folded map's KL is a
    lower bound); not supported iff there is no such pair or its KLs do not differ so; not testable
    yet while the file is absent."""
    evidence = (FILES["underdetermination"], "notebooks/underdetermination.py")
    data = inputs.get("underdetermination")
    if data is None:
        return Verdict(NOT_YET, f"{FILES['underdetermination']}: {inputs.files['underdetermination'].status}",
                       evidence)
    pair = need(data, "closest_pair", FILES["underdetermination"])
    if not pair:
        return Verdict(NOT_SUPPORTED, "no pair of snapshots with equal trajectory-matching loss", evidence)
    a, b = pair["a"], pair["b"]
    equal_tm = abs(pair["tm_difference"]) <= pair["within_se"] * pair["tm_difference_paired_se"]
    low = min((a, b), key=lambda r: r["kl"])
    distinct = abs(a["kl"] - b["kl"]) > cfg.z * math.hypot(a["kl_se"], b["kl_se"]) and low.get("folded", 0) == 0
    reason = (f"{a['student']} step {a['step']} and {b['student']} step {b['step']}: TM loss difference "
              f"{fmt(pair['tm_difference'])} (paired SE {fmt(pair['tm_difference_paired_se'])}, tolerance "
              f"{fmt(pair['within_se'])} SE): {'equal' if equal_tm else 'not equal'}; KL {fmt(a['kl'])} ± "
              f"{fmt(a['kl_se'])} vs {fmt(b['kl'])} ± {fmt(b['kl_se'])} (SE; folded {fmt(a.get('folded'))}, "
              f"{fmt(b.get('folded'))}): {'different' if distinct else 'not shown different'} at z = {published(cfg.z)}")
    return Verdict(SUPPORTED if equal_tm and distinct else NOT_SUPPORTED, reason, evidence)


def telescoping_bound_toy2d(inputs: Inputs, cfg: ReportConfig) -> Verdict:
    """Supported iff every inequality of the TV-bound stage (the final TV against the sum of local
    TVs, that against the Pinsker sum of local KLs, and the student-ODE bound by the MA value
    estimator) holds for every student: lhs at most rhs plus its slack (the stage's combined
    standard errors), recomputed here from the three numbers, not read from the stage's flag; not
    supported iff one fails; not testable yet without the file or its checks."""
    evidence = (FILES["tv_bound"], "notebooks/tv_bound.py")
    data = inputs.get("tv_bound")
    if data is None:
        return Verdict(NOT_YET, f"{FILES['tv_bound']}: {inputs.files['tv_bound'].status}", evidence)
    checks = need(data, "checks", FILES["tv_bound"])
    if not checks:
        return Verdict(NOT_YET, "the TV-bound stage checked no inequality", evidence)
    failed = [c for c in checks if not c["lhs"] <= c["rhs"] + c["slack"]]
    if failed:
        return Verdict(NOT_SUPPORTED, "fails: " + "; ".join(
            f"{c['student']}: {c['name']} ({fmt(c['lhs'])} > {fmt(c['rhs'])} + {fmt(c['slack'])})" for c in failed),
            evidence)
    return Verdict(SUPPORTED, "every inequality holds: " + "; ".join(
        f"{c['student']}: {c['name']} ({fmt(c['lhs'])} vs {fmt(c['rhs'])})" for c in checks), evidence)


def needs_exact_densities(inputs: Inputs, cfg: ReportConfig) -> Verdict:
    """Not testable here: the test needs the exact marginal densities of the teacher along its
    path, which only the exact mixture tier has."""
    return Verdict(NOT_HERE, "needs the teacher's exact marginal densities (the exact mixture tier only)")


def property_of_the_code(inputs: Inputs, cfg: ReportConfig) -> Verdict:
    """Not testable here: it is a property of the objective's code (what the MA term is computed from),
    which the unit tests named in paper.yaml check; no metric measures it."""
    return Verdict(NOT_HERE, "a property of the code, not of a metric", ("tests/test_core_marginal.py",))


Rule = Callable[[Inputs, ReportConfig], Verdict]
RULES: dict[str, dict[str, Rule]] = {
    "tm_underdetermined": {"toy2d": tm_underdetermined_toy2d, "images": needs_exact_densities},
    "ma_improves_marginal": {"toy2d": ma_improves_marginal_toy2d, "images": ma_improves_marginal_images},
    "ma_no_auxiliary_network": {"toy2d": property_of_the_code, "images": property_of_the_code},
    "telescoping_bound": {"toy2d": telescoping_bound_toy2d, "images": needs_exact_densities},
}


def assess(claims: list[dict[str, Any]], inputs: Inputs, cfg: ReportConfig) -> list[tuple[dict[str, Any], dict[str, Verdict]]]:
    """``(claim, {tier: verdict})`` for every claim, in ``paper.yaml``'s order."""
    out = []
    for claim in claims:
        rules = RULES.get(claim["id"])
        if rules is None:
            out.append((claim, {tier: Verdict(NO_RULE, "no rule is written for this claim (replication/report/claims.py)")
                                for tier in TIERS}))
        else:
            out.append((claim, {tier: rules[tier](inputs, cfg) for tier in TIERS}))
    return out


def rule_text(claim_id: str, tier: str) -> str:
    """The written rule (the rule function's docstring, on one line)."""
    rule = RULES.get(claim_id, {}).get(tier)
    return " ".join((rule.__doc__ or "").split()) if rule else "no rule"
