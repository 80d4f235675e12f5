"""The comparison report and the headline metrics, on small hand-written metrics files.

Checked against values written out by hand here (never against the code's own output): the flat
headline keys of a fake file; missing inputs and values shown as missing, never as 0; a published
row marked comparable only when every protocol field agrees; each claim's rule on metrics built to
make it supported, not supported and not testable; and the provenance check, which passes on the
report of fake inputs and of the committed results and fails once a number with no source is typed
into the text (re-checked by an independent rounding test).
"""

from __future__ import annotations

import copy
import json
import re
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest
import yaml

from replication.config import ConfigError, from_dict, load_params
from replication.references import check_paper, load_paper, load_peer_entries
from replication.report import build as build_mod
from replication.report.build import ProvenanceError, build, context, sources, write_report
from replication.report.claims import (
    NOT_HERE,
    NOT_SUPPORTED,
    NOT_YET,
    RULES,
    SUPPORTED,
    TIERS,
    assess,
)
from replication.report.config import ReportConfig
from replication.report.headline import headline
from replication.report.inputs import ReportInputError, load_inputs
from replication.report.numbers import check_provenance, fmt, tokens
from replication.report.protocols import comparison_rows, references

ROOT = Path(__file__).resolve().parents[1]
MISSING = "–"  # how the report prints a missing value

REPORT = {"nfe": [1, 4], "toy2d_metrics": ["kl", "tv"], "images_metrics": ["kl", "domain_fd_teacher"],
          "lower_is_better": ["kl", "tv", "domain_fd_teacher"], "higher_is_better": ["domain_recall_teacher"],
          "ma_comparisons": ["perflow_ma - perflow"], "alpha": 0.05, "z": 2.0}
IMAGES = {"dataset": "digits", "size": 8}

FIG1 = {"n_samples": 1000, "noise_floor": {"off_mode": 0.0114, "mass_error": 0.0068},
        "table": [
            {"student": "perflow", "nfe": 4, "kl": 1.7, "kl_se": 0.027, "tv": 0.38, "tv_se": 0.0026, "off_mode": 0.21,
             "off_mode_se": 0.0029, "mode_mass_error": 0.03, "folded": 0.0, "crosses_windows": False, "status": "ok"},
            {"student": "perflow_ma", "nfe": 4, "kl": None, "kl_se": None, "tv": 0.22, "tv_se": 0.0025,
             "off_mode": 0.16, "off_mode_se": 0.0026, "mode_mass_error": 0.023, "folded": 0.5,
             "crosses_windows": False, "status": "folded: density undefined"},
            {"student": "perflow", "nfe": 2, "kl": 5.8, "kl_se": 0.054, "tv": 0.7, "tv_se": 0.0027, "off_mode": 0.51,
             "off_mode_se": 0.0035, "mode_mass_error": 0.064, "folded": 0.0, "crosses_windows": True, "status": "ok"},
        ]}
TV_BOUND = {"n_samples": 1000,
            "summary": [{"student": "perflow", "final_tv": 0.38, "final_tv_se": 0.0026, "sum_local_tv": 0.67,
                         "sum_local_tv_se": 0.0033, "pinsker_local_kl": 1.04, "pinsker_local_kl_se": 0.0078}],
            "checks": [{"student": "perflow", "name": "sampler: TV <= sum local TV", "lhs": 0.38, "rhs": 0.67,
                        "slack": 0.0085, "holds": True}]}
UNDERDETERMINATION = {
    "analytic": [{"student": "rotated T(R x0)", "kl": 1.2e-07, "kl_se": 2e-08, "matching_error": 0.89,
                  "tv": 5.8e-07, "tv_se": 1.8e-08}],
    "closest_pair": {"a": {"student": "perflow", "step": 1250, "kl": 2.28, "kl_se": 0.031, "folded": 0.0},
                     "b": {"student": "perflow_ma", "step": 1750, "kl": 1.14, "kl_se": 0.023, "folded": 0.0},
                     "kl_ratio": 1.99, "tm_difference": -0.0013, "tm_difference_paired_se": 0.00116,
                     "tm_gap_in_paired_se": 1.12, "within_se": 2.0}}
IMAGES_TABLE = {
    "counts": {"inception_samples": 48, "reference_images": 359},
    "headline_metrics": ["kl", "domain_fd_teacher"],
    "summary": [
        {"method": "perflow", "nfe": 4, "kl": 21.5, "kl_ci95": 2.4, "kl_seeds": 5.0, "domain_fd_teacher": 77.6,
         "domain_fd_teacher_ci95": 16.3, "domain_fd_teacher_seeds": 5.0, "fid": 51.3},
        {"method": "teacher (Euler)", "nfe": 4, "kl": 38.3, "kl_ci95": None, "kl_seeds": 1.0,
         "domain_fd_teacher": None, "domain_fd_teacher_ci95": None, "domain_fd_teacher_seeds": None},
        {"method": "perflow", "nfe": 8, "kl": None, "kl_ci95": None, "kl_seeds": None, "domain_fd_teacher": 34.2,
         "domain_fd_teacher_ci95": 10.7, "domain_fd_teacher_seeds": 5.0},
    ],
    "rows": [{"method": m, "seed": 0, "nfe": n, "fewer_steps_than_windows": n < 4}
             for m in ("perflow", "perflow_ma") for n in (1, 4)],
    "paired_tests_holm": [
        {"comparison": "perflow_ma - perflow", "metric": "kl", "nfe": 4, "delta": 9.4, "ci95": 6.6, "p_holm": 0.18,
         "mde": 16.6, "verdict_holm": "not detected (MDE 16.6)"},
        {"comparison": "perflow_ma - perflow", "metric": "domain_recall_teacher", "nfe": 4, "delta": -0.0146,
         "ci95": 0.064, "p_holm": 1.0, "mde": 0.161, "verdict_holm": "not detected (MDE 0.161)"},
        {"comparison": "perflow_ma - perflow", "metric": "domain_fd_teacher", "nfe": 1, "delta": 233.5,
         "ci95": 35.4, "p_holm": 0.00068, "mde": 88.7, "verdict_holm": "MA worse"},
    ]}

FILES = {"results/toy2d/fig1_mog/metrics.json": FIG1, "results/toy2d/tv_bound/metrics.json": TV_BOUND,
         "results/toy2d/underdetermination/metrics.json": UNDERDETERMINATION,
         "results/images/table/metrics.json": IMAGES_TABLE}


def _write(root: Path, files: dict[str, dict]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))
    return root


def _params(**report) -> dict:
    return {"images": dict(IMAGES), "report": {**REPORT, **report}}


def _cfg(**report) -> ReportConfig:
    return from_dict(ReportConfig, {**REPORT, **report}, "report")


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    return rest[: stop.start()] if stop else rest


def _cells(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


# ---------------------------------------------------------------- headline.json

def test_headline_flattens_a_fake_file_to_the_hand_written_keys(tmp_path):
    root = _write(tmp_path, FILES)
    flat = headline(load_inputs(root), _cfg())
    expected = {
        # fig1: nfe 4 only (nfe 2 is not a headline NFE), perflow_ma's missing KL left out
        "toy2d.kl.perflow.nfe4.mean": 1.7, "toy2d.kl.perflow.nfe4.se": 0.027,
        "toy2d.tv.perflow.nfe4.mean": 0.38, "toy2d.tv.perflow.nfe4.se": 0.0026,
        "toy2d.tv.perflow_ma.nfe4.mean": 0.22, "toy2d.tv.perflow_ma.nfe4.se": 0.0025,
        "toy2d.tv_bound.perflow.final_tv.mean": 0.38, "toy2d.tv_bound.perflow.final_tv.se": 0.0026,
        "toy2d.tv_bound.perflow.sum_local_tv.mean": 0.67, "toy2d.tv_bound.perflow.sum_local_tv.se": 0.0033,
        "toy2d.tv_bound.perflow.pinsker_local_kl.mean": 1.04, "toy2d.tv_bound.perflow.pinsker_local_kl.se": 0.0078,
        "toy2d.underdetermination.closest_pair.kl_ratio": 1.99,
        "toy2d.underdetermination.closest_pair.tm_gap_in_paired_se": 1.12,
        "toy2d.underdetermination.analytic.rotated_t_r_x0.kl": 1.2e-07,
        "toy2d.underdetermination.analytic.rotated_t_r_x0.matching_error": 0.89,
        # images: nfe 8 is not a headline NFE; the teacher (Euler) row's name sanitized
        "images.kl.perflow.nfe4.mean": 21.5, "images.kl.perflow.nfe4.ci95": 2.4, "images.kl.perflow.nfe4.seeds": 5,
        "images.domain_fd_teacher.perflow.nfe4.mean": 77.6, "images.domain_fd_teacher.perflow.nfe4.ci95": 16.3,
        "images.domain_fd_teacher.perflow.nfe4.seeds": 5,
        "images.kl.teacher_euler.nfe4.mean": 38.3, "images.kl.teacher_euler.nfe4.seeds": 1,
        # deltas of the headline metrics only (domain_recall_teacher is not one); its verdict is a word
        "images.delta.kl.perflow_ma_vs_perflow.nfe4.delta": 9.4,
        "images.delta.kl.perflow_ma_vs_perflow.nfe4.p_holm": 0.18,
        "images.delta.kl.perflow_ma_vs_perflow.nfe4.mde": 16.6,
        "images.delta.domain_fd_teacher.perflow_ma_vs_perflow.nfe1.delta": 233.5,
        "images.delta.domain_fd_teacher.perflow_ma_vs_perflow.nfe1.p_holm": 0.00068,
        "images.delta.domain_fd_teacher.perflow_ma_vs_perflow.nfe1.mde": 88.7,
    }
    assert flat == expected
    assert list(flat) == sorted(flat)
    assert isinstance(flat["images.kl.perflow.nfe4.seeds"], int)


def test_headline_of_the_optional_inputs(tmp_path):
    files = {
        "results/toy2d/test/metrics.json": {
            "seeds": {"validation": [1, 2], "test": [5, 6]}, "n_samples": 500,
            "selected": [{"student": "perflow_ma", "parameter": "ma_weight", "grid": ["0.1", "0.3", "1"],
                          "value": "0.3", "criterion": "kl at nfe 4", "score": 1.1, "score_hw": 0.2,
                          "runner_up": "1", "runner_up_score": 1.25, "within_interval": True, "on_grid_edge": False}],
            "rows": [{"student": "perflow_ma", "nfe": 4, "kl": 0.9, "kl_hw": 0.05, "tv": 0.2, "tv_hw": 0.01,
                      "crosses_windows": False, "status": "ok"},
                     {"student": "perflow", "nfe": 8, "kl": 0.8, "crosses_windows": False, "status": "ok"},
                     {"student": "perflow", "nfe": 4, "kl": None, "crosses_windows": False, "status": "folded"}],
            "comparisons": [{"comparison": "perflow_ma - perflow", "metric": "kl", "nfe": 4, "delta": -0.7,
                             "p_holm": 0.004, "mde": 0.3, "verdict": "MA better"}]},
        "results/toy2d/ablation/metrics.json": {
            "seeds": [5], "n_samples": 500,
            "rows": [{"variant": "no_logdet", "description": "d", "nfe": 4, "kl": 1.3, "kl_hw": 0.1, "tv": 0.3,
                      "tv_hw": 0.02, "off_mode": 0.2, "mode_mass_error": 0.05, "folded": 0.0,
                      "mflops_per_step": 3.5, "saved_mib_per_step": 12.0, "status": "ok"}]},
        "results/toy2d/sweep/ma_weight/metrics.json": {
            "family": "ma_weight", "student": "perflow_ma", "parameter": "ma_weight", "values": [0.1, 0.3],
            "split": "validation", "seeds": [1, 2], "n_samples": 500, "interval": "t half-width",
            "rows": [{"value": 0.3, "ma": True, "nfe": 4, "seeds": 2, "kl": 1.0, "kl_hw": 0.2, "tv": 0.25,
                      "tv_hw": 0.03, "status": "ok"},
                     {"value": 0.3, "ma": False, "nfe": 4, "seeds": 2, "kl": 1.5, "status": "ok"}]},
    }
    flat = headline(load_inputs(_write(tmp_path, files)), _cfg())
    assert flat == {
        "toy2d.test.kl.perflow_ma.nfe4.mean": 0.9, "toy2d.test.kl.perflow_ma.nfe4.hw": 0.05,
        "toy2d.test.tv.perflow_ma.nfe4.mean": 0.2, "toy2d.test.tv.perflow_ma.nfe4.hw": 0.01,
        "toy2d.test.delta.kl.perflow_ma_vs_perflow.nfe4.delta": -0.7,
        "toy2d.test.delta.kl.perflow_ma_vs_perflow.nfe4.p_holm": 0.004,
        "toy2d.test.delta.kl.perflow_ma_vs_perflow.nfe4.mde": 0.3,
        "toy2d.selection.perflow_ma.ma_weight.value": 0.3, "toy2d.selection.perflow_ma.ma_weight.score": 1.1,
        "toy2d.ablation.kl.no_logdet.nfe4.mean": 1.3, "toy2d.ablation.kl.no_logdet.nfe4.hw": 0.1,
        "toy2d.ablation.mflops_per_step.no_logdet": 3.5, "toy2d.ablation.saved_mib_per_step.no_logdet": 12.0,
    }
    from replication.report.headline import Flat, toy2d_sweeps

    sweeps = Flat()
    toy2d_sweeps(load_inputs(tmp_path), _cfg(), sweeps)
    assert sweeps.values == {
        "toy2d.sweep.ma_weight.kl.v0_3_noma.nfe4.mean": 1.5,
        "toy2d.sweep.ma_weight.kl.v0_3.nfe4.mean": 1.0, "toy2d.sweep.ma_weight.kl.v0_3.nfe4.hw": 0.2,
        "toy2d.sweep.ma_weight.tv.v0_3.nfe4.mean": 0.25, "toy2d.sweep.ma_weight.tv.v0_3.nfe4.hw": 0.03,
    }
    (tmp_path / "results/toy2d/sensitivity").mkdir(parents=True)
    (tmp_path / "results/toy2d/sensitivity/sensitivity.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    ctx = context(tmp_path, _params())
    text = build(ctx)
    assert "![sensitivity](../toy2d/sensitivity/sensitivity.png)" in text
    sweep = _section(text, "### Sensitivity sweeps (sweep)")
    assert "validation seeds 1, 2, 500 samples; ± is t half-width" in sweep
    assert _cells(sweep, "0.3") == ["0.3", "yes", "4", "2", "1 ± 0.200", "0.250 ± 0.0300", MISSING, MISSING, MISSING,
                                    "ok"]
    assert _cells(_section(text, "### Ablation (ablation)"), "`no_logdet`")[2:10] == [
        "4", "1.30 ± 0.100", "0.300 ± 0.0200", "0.200", "0.0500", "0", "3.50", "12"]
    assert check_provenance(text, sources(ctx)) == [] and _independent_strays(text, sources(ctx)) == []
    selection = _section(text, "### Selected hyper-parameters (selection)")
    assert _cells(selection, "perflow_ma")[1:] == ["`ma_weight`", "0.1, 0.3, 1", "0.3", "kl at nfe 4", "1.10 ± 0.200",
                                                   "1 (1.25)", "yes", "no"]
    assert "validation seeds (1, 2)" in selection and "test seeds (5, 6)" in selection
    assert _cells(_section(text, "### Held-out test seeds (test)"), "`perflow_ma - perflow`")[3:] == [
        "yes", "-0.700", "0.00400", "0.300", "MA better", "better"]


def test_a_metric_name_that_is_no_column_is_refused_naming_the_key(tmp_path):
    root = _write(tmp_path, FILES)
    with pytest.raises(ReportInputError, match=r"report\.toy2d_metrics\[1\] = 'kll': no such column"):
        headline(load_inputs(root), _cfg(toy2d_metrics=["kl", "kll"]))


# ---------------------------------------------------------------- the builder

def test_absent_inputs_are_not_run_and_add_nothing(tmp_path):
    ctx = context(tmp_path, _params())
    text = build(ctx)
    assert headline(ctx.inputs, ctx.cfg) == {}
    for rel in ("results/toy2d/fig1_mog/metrics.json",
                "results/toy2d/test/metrics.json", "results/toy2d/ablation/metrics.json",
                "results/images/table/metrics.json", "results/toy2d/sensitivity/sensitivity.png"):
        assert f"| `{rel}` | not run |" in text
    assert "`results/toy2d/test/metrics.json`: not run." in text
    assert "](../toy2d/test/metrics.json)" not in text and "`results/toy2d/test/metrics.json`" in text  # no dead link
    assert "`results/toy2d/sweep/<family>/metrics.json`: not run." in text
    verdicts = {c["id"]: v for c, v in assess(load_paper()["claims"], ctx.inputs, ctx.cfg)}
    assert verdicts["ma_improves_marginal"]["toy2d"].verdict == NOT_YET
    assert verdicts["ma_improves_marginal"]["images"].verdict == NOT_YET
    assert verdicts["telescoping_bound"]["toy2d"].verdict == NOT_YET
    assert check_provenance(text, sources(ctx)) == []


def test_missing_values_print_as_missing_never_as_zero(tmp_path):
    text = build(context(_write(tmp_path, FILES), _params()))
    fig1 = _section(text, "### Few-step quality (fig1_mog)")
    # perflow_ma at 4 NFE has no KL: a dash; its folded share 0.5 and perflow's true 0 print as such
    assert _cells(fig1, "perflow_ma")[:4] == ["perflow_ma", "4", "no", MISSING]
    assert _cells(fig1, "perflow")[3:8] == ["1.70 ± 0.0270", "0.380 ± 0.00260", "0.210 ± 0.00290", "0.0300", "0"]
    images = _section(text, "### Main table (table_images)")
    # the teacher (Euler) row has a KL without interval and no domain FD
    assert _cells(images, "teacher (Euler)") == ["teacher (Euler)", "4", "1", "38.30", MISSING]
    assert fmt(None) == MISSING and fmt(float("nan")) == MISSING and fmt(0.0) == "0"


def test_a_skipped_stage_is_reported_as_skipped(tmp_path):
    root = _write(tmp_path, {**FILES, "results/images/table/metrics.json": {"skipped": "no labels"}})
    ctx = context(root, _params())
    text = build(ctx)
    assert "| [results/images/table/metrics.json](../images/table/metrics.json) | skipped: no labels |" in text
    assert not [k for k in headline(ctx.inputs, ctx.cfg) if k.startswith("images.")]


def test_published_rows_are_comparable_only_when_every_field_matches():
    cifar = next(r for r in load_peer_entries() if r["protocol"] == "cifar10_50k" and r["method"] == "2-Rectified Flow"
                 and r["fields"]["steps"] == 1)
    same = dict(cifar["fields"])
    rows = {(r["protocol"], r["method"], r["steps"]): r for r in comparison_rows([("ours (1 NFE)", same)])}
    assert rows[("cifar10_50k", "2-Rectified Flow", 1)]["comparable"] == "yes: ours (1 NFE)"
    # the method is no protocol field: every undistilled one-step Euler row of that table matches
    assert [k for k, r in rows.items() if r["comparable"].startswith("yes")] == [
        ("cifar10_50k", f"{k}-Rectified Flow", 1) for k in (1, 2, 3)]
    # the distilled row differs on one field only, which is named with both values
    assert rows[("cifar10_50k", "2-Rectified Flow (+Distill)", 1)]["comparable"] == (
        "no: distillation (published one-step distillation of k-RF; ours none)")
    # the paper's own row is unknown everywhere: never comparable
    assert all(r["comparable"].startswith("no: ") for r in rows.values() if "(paper)" in r["method"])
    fewer = comparison_rows([("ours (1 NFE)", {**same, "samples": 48})])
    assert next(r for r in fewer if r["protocol"] == "cifar10_50k" and r["method"] == "2-Rectified Flow"
                and r["steps"] == 1)["comparable"] == (
        "no: samples (published 50000; ours 48)")


def test_every_reference_row_of_the_image_tier_says_digits_are_not_comparable(tmp_path):
    text = build(context(_write(tmp_path, FILES), _params()))
    section = _section(_section(text, "## The image tier (images)"), "### Published numbers at matching protocol")
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| source", "| ---"))]
    assert len(rows) == len(references()) == len(load_peer_entries()) + 3  # + the paper's row per protocol
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        assert cell.startswith("no: dataset (published ") and "ours digits 8x8 (held-out split))" in cell, row
    paper = [r for r in rows if "(paper)" in r]
    assert len(paper) == 3 and all(" | unknown | " in r for r in paper)


def test_links_are_relative_to_the_report_folder(tmp_path):
    root = _write(tmp_path, FILES)
    for rel in ("results/toy2d/fig1_mog/fig1_mog.ipynb", "results/.failed/x/x.ipynb",
                "results/.report.tmp-1/report.ipynb", "results/report/report.ipynb"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    ctx = context(root, _params())
    assert ctx.inputs.notebooks == ("results/toy2d/fig1_mog/fig1_mog.ipynb",)
    notebooks = _section(build(ctx), "## Executed notebooks")
    assert notebooks.strip() == "- [results/toy2d/fig1_mog/fig1_mog.ipynb](../toy2d/fig1_mog/fig1_mog.ipynb)"


# ---------------------------------------------------------------- the claims' rules

def _verdict(claim: str, tier: str, files: dict, tmp_path: Path, **report) -> tuple[str, str]:
    v = RULES[claim][tier](load_inputs(_write(tmp_path, files)), _cfg(**report))
    return v.verdict, v.reason


def _images_with(tests: list[dict], out_of_design: tuple[int, ...] = (1,)) -> dict:
    table = copy.deepcopy(IMAGES_TABLE)
    table["paired_tests_holm"] = tests
    table["rows"] = [{"method": m, "seed": s, "nfe": n, "fewer_steps_than_windows": n in out_of_design}
                     for m in ("perflow", "perflow_ma") for s in (0, 1) for n in (1, 4, 8)]
    table["rows"] += [{"method": m, "seed": 0, "nfe": n, "fewer_steps_than_windows": False}
                      for m in ("reflow", "reflow_ma") for n in (1, 4, 8)]
    return {"results/images/table/metrics.json": table}


def _test(metric: str, nfe: int, delta: float, p: float | None, comparison: str = "perflow_ma - perflow") -> dict:
    return {"comparison": comparison, "metric": metric, "nfe": nfe, "delta": delta, "p_holm": p, "mde": 1.0}


@pytest.mark.parametrize(("tests", "expected"), [
    ([_test("kl", 4, -3.0, 0.01)], SUPPORTED),                                   # better, none worse
    ([_test("domain_recall_teacher", 8, 0.2, 0.01)], SUPPORTED),                 # higher is better
    ([_test("kl", 4, -3.0, 0.01), _test("domain_fd_teacher", 8, 20.0, 0.02)], NOT_SUPPORTED),  # one worse
    ([_test("kl", 4, -3.0, 0.2)], NOT_SUPPORTED),                                # nothing significant
    ([_test("kl", 4, -3.0, 0.05)], NOT_SUPPORTED),                               # p must be below alpha
    ([_test("kl", 4, -3.0, 0.01), _test("kl", 1, 50.0, 0.001)], SUPPORTED),      # worse out of design: not counted
    ([_test("kl", 1, -50.0, 0.001)], NOT_YET),                                   # only out of design
    ([_test("kl", 4, -3.0, None)], NOT_YET),                                     # one seed: untested
    ([_test("fid", 4, -3.0, 0.01)], NOT_YET),                                    # not a quality metric
    ([_test("kl", 4, -3.0, 0.01, "reflow_ma - reflow")], NOT_YET),               # in design, not in ma_comparisons
])
def test_the_ma_rule_on_the_image_tier(tmp_path, tests, expected):
    assert _verdict("ma_improves_marginal", "images", _images_with(tests), tmp_path)[0] == expected


def test_the_ma_rule_reads_in_design_from_the_rows(tmp_path):
    """A test at an NFE where one seed's row has fewer steps than windows is out of design."""
    files = _images_with([_test("kl", 4, -3.0, 0.01)], out_of_design=())
    files["results/images/table/metrics.json"]["rows"][1]["fewer_steps_than_windows"] = True  # perflow seed 0, nfe 4
    assert _verdict("ma_improves_marginal", "images", files, tmp_path)[0] == NOT_YET


def test_the_ma_rule_on_the_2d_tier_uses_the_test_file(tmp_path):
    assert _verdict("ma_improves_marginal", "toy2d", FILES, tmp_path) == (
        NOT_YET, "results/toy2d/test/metrics.json: not run")
    rows = [{"student": s, "nfe": n, "crosses_windows": n < 4} for s in ("perflow", "perflow_ma") for n in (2, 4)]
    test = {"seeds": [5, 6], "n_samples": 500, "rows": rows,
            "comparisons": [_test("tv", 4, -0.1, 0.001), _test("kl", 2, 4.0, 0.001)]}
    verdict, reason = _verdict("ma_improves_marginal", "toy2d", {"results/toy2d/test/metrics.json": test}, tmp_path)
    assert verdict == SUPPORTED and "not counted (outside the design): worse: kl at NFE 2" in reason
    test["comparisons"].append(_test("kl", 4, 0.5, 0.01))
    assert _verdict("ma_improves_marginal", "toy2d", {"results/toy2d/test/metrics.json": test},
                    tmp_path)[0] == NOT_SUPPORTED


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda p: None, SUPPORTED),
    (lambda p: p["b"].update(kl=2.25), NOT_SUPPORTED),                  # |2.28 - 2.25| < 2 * hypot(SEs)
    (lambda p: p.update(tm_difference=-0.0030), NOT_SUPPORTED),         # beyond 2 paired SEs: TM not equal
    (lambda p: p["b"].update(folded=0.01), NOT_SUPPORTED),              # the smaller KL is a lower bound
    (lambda p: p["a"].update(folded=0.01), SUPPORTED),                  # the larger one may be
])
def test_the_underdetermination_rule(tmp_path, edit, expected):
    data = copy.deepcopy(UNDERDETERMINATION)
    edit(data["closest_pair"])
    files = {"results/toy2d/underdetermination/metrics.json": data}
    assert _verdict("tm_underdetermined", "toy2d", files, tmp_path)[0] == expected


def test_the_underdetermination_rule_uses_z(tmp_path):
    files = {"results/toy2d/underdetermination/metrics.json": UNDERDETERMINATION}
    # |2.28 - 1.14| = 1.14 against hypot(0.031, 0.023) = 0.0386: distinct at z = 2, not at z = 30
    assert _verdict("tm_underdetermined", "toy2d", files, tmp_path, z=30.0)[0] == NOT_SUPPORTED
    nopair = {**UNDERDETERMINATION, "closest_pair": None}
    assert _verdict("tm_underdetermined", "toy2d", {"results/toy2d/underdetermination/metrics.json": nopair},
                    tmp_path)[0] == NOT_SUPPORTED


def test_the_telescoping_rule_recomputes_each_inequality(tmp_path):
    assert _verdict("telescoping_bound", "toy2d", FILES, tmp_path)[0] == SUPPORTED
    bad = copy.deepcopy(TV_BOUND)
    bad["checks"].append({"student": "perflow_ma", "name": "ODE bound", "lhs": 0.5, "rhs": 0.4, "slack": 0.05,
                          "holds": True})  # the flag says it holds; 0.5 > 0.4 + 0.05 says not
    verdict, reason = _verdict("telescoping_bound", "toy2d", {"results/toy2d/tv_bound/metrics.json": bad}, tmp_path)
    assert verdict == NOT_SUPPORTED and "perflow_ma: ODE bound" in reason
    empty = {**TV_BOUND, "checks": []}
    assert _verdict("telescoping_bound", "toy2d", {"results/toy2d/tv_bound/metrics.json": empty}, tmp_path)[0] == NOT_YET


def test_every_claim_of_the_paper_has_a_rule_on_every_tier(tmp_path):
    claims = load_paper()["claims"]
    ids = [c["id"] for c in claims]
    assert len(ids) == len(set(ids)) and set(ids) == set(RULES)
    assert all(set(RULES[i]) == set(TIERS) for i in ids)
    verdicts = {c["id"]: v for c, v in assess(claims, load_inputs(_write(tmp_path, FILES)), _cfg())}
    assert verdicts["ma_no_auxiliary_network"]["toy2d"].verdict == NOT_HERE
    assert verdicts["telescoping_bound"]["images"].verdict == NOT_HERE


# ---------------------------------------------------------------- references schema (beyond test_references.py)

def _raw(name: str) -> dict:
    return yaml.safe_load(resources.files("replication.references").joinpath(name).read_text())


def test_a_paper_number_without_a_source_is_refused():
    paper = copy.deepcopy(_raw("paper.yaml"))
    check_paper(copy.deepcopy(paper))
    paper["numbers"][2]["source"] = ""
    with pytest.raises(ValueError, match=r"numbers\[2\] \(FID\): no source"):
        check_paper(paper)


def test_every_reference_protocol_lists_its_metrics_and_every_entry_gives_them():
    raw = _raw("peers.yaml")
    for entry in raw["entries"]:
        metrics = raw["protocols"][entry["protocol"]]["metrics"]
        assert metrics and all(m in entry for m in metrics), entry["method"]


# ---------------------------------------------------------------- provenance

def _independent_strays(text: str, data: list) -> list[str]:
    """The numeric tokens of ``text`` that are not, to their printed precision, a number of ``data``
    (or a number written inside one of its strings): a decimal token must lie within half a unit of
    its last digit of some source number, an integer token must equal one. Written apart from the
    report's own check and formatting."""
    numbers: list[Decimal] = []
    words: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k)
                walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            words.update(re.findall(r"(?<![A-Za-z\d.])\d+(?:\.\d+)?(?![A-Za-z\d])", node))
        elif isinstance(node, int | float) and not isinstance(node, bool) and node == node:
            numbers.append(Decimal(repr(float(node))))

    walk(data)
    strays = []
    for tok in re.findall(r"(?<![\w.\-/])-?\d+(?:\.\d+)?(?:e[-+]\d+)?(?!\w)", text):
        value = Decimal(tok)
        if tok.lstrip("-") in words:
            continue
        mantissa = tok.split("e")[0]
        if "." in mantissa:
            exponent = int(tok.split("e")[1]) if "e" in tok else 0
            half = Decimal(5) * Decimal(10) ** (exponent - len(mantissa.split(".")[1]) - 1)
            if any(abs(n - value) <= half for n in numbers):
                continue
        elif any(n == value for n in numbers):
            continue
        strays.append(tok)
    return strays


def test_every_number_of_a_fake_report_comes_from_its_inputs(tmp_path):
    ctx = context(_write(tmp_path, FILES), _params())
    text = build(ctx)
    assert tokens(text), "the fake report prints numbers"
    assert check_provenance(text, sources(ctx)) == []
    assert _independent_strays(text, sources(ctx)) == []


def test_the_provenance_check_fails_on_a_number_typed_into_the_report(tmp_path, monkeypatch):
    ctx = context(_write(tmp_path, FILES), _params())
    text = build(ctx)
    for injected in ("0.123", "1.71", "42", "-4.2", "3.3e-05"):
        forged = text.replace("## Executed notebooks", f"MA halves the KL: {injected} nats.\n\n## Executed notebooks")
        assert check_provenance(forged, sources(ctx)) == [injected]
        assert _independent_strays(forged, sources(ctx)) == [injected]
    # the builder refuses to write such a report
    monkeypatch.setattr(build_mod, "SECTIONS", (*build_mod.SECTIONS, lambda c: ["It is 17.5 times better."]))
    with pytest.raises(ProvenanceError, match=r"17\.5"):
        write_report(tmp_path, _params(), tmp_path / "out")
    assert not (tmp_path / "out" / "REPORT.md").exists()


def test_numbers_glued_to_words_are_not_numbers():
    assert tokens("toy2d nfe4 8x8 fig1_mog COCO-2017 v1.2 sqrt(KL/2)") == []
    assert tokens("KL 3.59 ± 0.0425, delta -4.55, p 7.91e-08 (published 4; ours 1) | 2 |") == [
        "3.59", "0.0425", "-4.55", "7.91e-08", "4", "1", "2"]


def test_the_report_rounding():
    assert [fmt(v) for v in (5.0, 3, 0.38234, 2.9999, 7.9137e-08, 22.97, 233.509, 2017.127, -4.5528)] == [
        "5", "3", "0.382", "3.00", "7.91e-08", "22.97", "233.51", "2017.1", "-4.55"]


@pytest.mark.skipif(not (ROOT / "results/toy2d/fig1_mog/metrics.json").is_file(), reason="no committed results")
def test_the_report_of_the_committed_results_has_a_source_for_every_number(tmp_path):
    params = load_params(ROOT / "params.yaml")
    text, flat = write_report(ROOT, {"images": params["images"], "report": params["report"]}, tmp_path)
    ctx = context(ROOT, {"images": params["images"], "report": params["report"]})
    assert _independent_strays(text, sources(ctx)) == []
    assert (tmp_path / "REPORT.md").read_text() == text
    assert json.loads((tmp_path / "headline.json").read_text()) == flat
    # every headline cell of five tables (fig1, test, ablation KL, the image summary, the Holm deltas):
    # hundreds, not thousands (the sweep families stay in their own files)
    assert 30 <= len(flat) <= 600 and all(isinstance(v, int | float) for v in flat.values())
    fig1 = json.loads((ROOT / "results/toy2d/fig1_mog/metrics.json").read_text())
    row = next(r for r in fig1["table"] if r["student"] == "perflow_ma" and r["nfe"] == 4)
    assert flat["toy2d.kl.perflow_ma.nfe4.mean"] == row["kl"] and flat["toy2d.kl.perflow_ma.nfe4.se"] == row["kl_se"]


# ---------------------------------------------------------------- params

@pytest.mark.parametrize(("edit", "message"), [
    ({"alpha": 1.5}, "report.alpha = 1.5: must lie in (0, 1)"),
    ({"z": 0.0}, "report.z = 0.0: must be > 0"),
    ({"higher_is_better": ["kl"]}, "report.higher_is_better[0] = 'kl': listed twice, or also in lower_is_better"),
    ({"ma_comparisons": ["perflow_ma vs perflow"]}, "report.ma_comparisons[0] = 'perflow_ma vs perflow'"),
    ({"nfe": [4, 4]}, "report.nfe = [4, 4]"),
    ({"lower_is_better": []}, "report.lower_is_better = []"),
])
def test_bad_report_params_are_refused_naming_the_key(edit, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**edit)
    assert str(err.value).startswith(message), str(err.value)
