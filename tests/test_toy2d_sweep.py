"""The 2-D sweeps, the honest selection, the test-seed comparison and the ablation's cost counter,
checked against hand computations and independent re-derivations (scipy's own t-tests and
intervals, closed-form FLOP counts, the MA surrogate computed directly)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from scipy import stats

from replication import registry
from replication.config import ConfigError, load_params
from replication.toy2d.ablation import step_cost
from replication.toy2d.selection import (
    SelectionError,
    SelectionRule,
    compare_students,
    select_value,
)
from replication.toy2d.sweep import aggregate, family_points, value_label

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    return load_params(ROOT / "params.yaml")


def _family(rows, seeds=(100, 101, 102), split="validation", values=("0", "0.1", "0.3", "1")):
    return {"split": split, "seeds": list(seeds), "parameter": "ma.weight", "values": list(values), "rows": rows}


def _cell(value, nfe, kl, hw=0.5, ma=True, status="ok"):
    return {"value": value, "nfe": nfe, "kl": kl, "kl_hw": hw, "ma": ma, "status": status}


# --- selection ------------------------------------------------------------------------------------

def test_selection_picks_the_lowest_validation_mean_at_its_nfe_and_skips_excluded_and_folded():
    rows = [_cell("0", 4, 0.1),                       # MA off: excluded
            _cell("0.1", 4, 0.9), _cell("0.3", 4, 0.7, hw=0.15), _cell("1", 4, 0.2, status="folded"),
            _cell("0.1", 2, 0.05),                    # other NFE: not the criterion
            _cell("0.3", 4, 0.01, ma=False)]          # a no-MA twin: not a candidate
    chosen = select_value("perflow_ma", SelectionRule("ma_weight", 4, "kl", [0.0]), _family(rows), [200, 201])
    assert chosen.value == "0.3" and chosen.score == 0.7
    assert chosen.runner_up == "0.1" and chosen.runner_up_score == 0.9
    assert chosen.within_interval is False            # 0.9 > 0.7 + 0.15
    assert chosen.grid == ["0", "0.1", "0.3", "1"] and chosen.seeds == [100, 101, 102]
    assert chosen.on_grid_edge is False               # 0.3 lies inside the eligible grid 0.1, 0.3, 1
    edge = select_value("s", SelectionRule("f", 4, exclude=[0.0]),
                        _family([_cell("0.1", 4, 0.9), _cell("0.3", 4, 0.7), _cell("1", 4, 0.6)]), [200])
    assert edge.value == "1" and edge.on_grid_edge is True
    wide = select_value("perflow_ma", SelectionRule("ma_weight", 4, "kl", [0.0]),
                        _family([_cell("0.1", 4, 0.9), _cell("0.3", 4, 0.7, hw=0.3)]), [200])
    assert wide.within_interval is True               # 0.9 <= 0.7 + 0.3: a choice inside the noise


def test_selection_ties_go_to_the_first_value_of_the_grid():
    rows = [_cell("1", 4, 0.5), _cell("0.1", 4, 0.5)]
    assert select_value("s", SelectionRule("f", 4), _family(rows), [200]).value == "0.1"


def test_selection_never_reads_test_seeds():
    rows = [_cell("0.1", 4, 0.5)]
    with pytest.raises(SelectionError, match="validation seeds only"):
        select_value("s", SelectionRule("f", 4), _family(rows, split="test"), [200])
    with pytest.raises(SelectionError, match=r"seeds \[101\] are test seeds"):
        select_value("s", SelectionRule("f", 4), _family(rows), [101, 300])
    with pytest.raises(ValueError, match="no eligible point"):
        select_value("s", SelectionRule("f", 4, exclude=[0.1]), _family(rows), [200])


def test_the_test_stage_selects_from_sweep_results_only(params):
    """The selection notebook reads the sweep folder (validation) and nothing under the test stage."""
    source = (ROOT / "notebooks" / "toy2d_test.py").read_text()
    selection_cell = source[source.index("## Selection"):source.index("## Every student")]
    assert "sweep_results" in selection_cell and "checkpoint_root" not in selection_cell
    assert "select_value(student, rule, family_metrics, sweep.test_seeds)" in selection_cell


# --- paired tests on the test seeds ---------------------------------------------------------------

def _runs(values: dict[str, list[float]], nfe=4, crosses=False):
    return pd.DataFrame([{"student": s, "seed": 200 + i, "nfe": nfe, "kl": v, "crosses_windows": crosses}
                         for s, vs in values.items() for i, v in enumerate(vs)])


def test_paired_tests_match_scipy_and_holm_by_hand():
    treated_a, control_a = [1.0, 1.2, 0.9, 1.1], [2.0, 2.1, 2.2, 1.9]
    treated_b, control_b = [3.0, 3.1, 2.8, 3.3], [3.05, 3.0, 2.9, 3.2]
    runs = pd.concat([_runs({"a": treated_a, "c": control_a}, nfe=2), _runs({"a": treated_b, "c": control_b}, nfe=4)])
    cells = compare_students(runs, [["a", "c"]], ["kl"], alpha=0.05, power=0.8)
    p2 = stats.ttest_rel(treated_a, control_a).pvalue
    p4 = stats.ttest_rel(treated_b, control_b).pvalue
    by_nfe = {c["nfe"]: c for c in cells}
    assert by_nfe[2]["p_value"] == pytest.approx(p2) and by_nfe[4]["p_value"] == pytest.approx(p4)
    small, large = sorted([p2, p4])
    holm = {p2: None, p4: None}
    holm[small] = min(1, 2 * small)
    holm[large] = max(holm[small], min(1, large))
    assert by_nfe[2]["p_holm"] == pytest.approx(holm[p2]) and by_nfe[4]["p_holm"] == pytest.approx(holm[p4])
    assert by_nfe[2]["delta"] == pytest.approx(sum(treated_a) / 4 - sum(control_a) / 4)
    assert by_nfe[2]["verdict"] == "treated better"        # KL lower by ~1 with a tight spread
    assert by_nfe[4]["verdict"] == "no difference shown"
    # the MDE at the family's most demanding level alpha / m, from the differences' sd
    sd = pd.Series([a - b for a, b in zip(treated_b, control_b, strict=True)]).std()
    mde = (stats.t.ppf(1 - 0.05 / 2 / 2, 3) + stats.t.ppf(0.8, 3)) * sd / math.sqrt(4)
    assert by_nfe[4]["mde"] == pytest.approx(mde)


def test_cells_without_spread_or_with_folded_seeds_are_not_tested():
    runs = pd.concat([_runs({"a": [1.0, 2.0, 3.0], "c": [0.5, 1.5, 2.5]}, nfe=1),
                      _runs({"a": [1.0, float("nan"), 3.0], "c": [1.0, 1.0, 1.0]}, nfe=2, crosses=True)])
    cells = {c["nfe"]: c for c in compare_students(runs, [["a", "c"]], ["kl"], 0.05, 0.8)}
    assert cells[1]["p_value"] is None and cells[1]["verdict"] == "untested: no spread between seeds"
    assert cells[2]["p_value"] is None and cells[2]["verdict"].startswith("untested: folded map")
    assert cells[2]["outside_design"] is True


# --- aggregation over seeds -----------------------------------------------------------------------

def test_aggregate_mean_and_student_t_half_width():
    kl = [0.5, 0.7, 0.9]
    runs = pd.DataFrame([{"value": "0.1", "ma": True, "nfe": 4, "seed": i, "status": "ok", "crosses_windows": False,
                          "kl": k, "tv": 0.1, "mode_mass_error": 0.01 * i, "off_mode": 0.2, "sliced_w2": 0.3,
                          "folded": 0.0} for i, k in enumerate(kl)])
    (cell,) = aggregate(runs, 0.95)
    low, high = stats.t.interval(0.95, 2, loc=0.7, scale=stats.sem(kl))
    assert cell["kl"] == pytest.approx(0.7) and cell["kl_hw"] == pytest.approx((high - low) / 2)
    assert cell["seeds"] == 3 and cell["status"] == "ok"
    folded = runs.assign(kl=[0.5, float("nan"), 0.9], status=["ok", "folded map", "ok"])
    (cell,) = aggregate(folded, 0.95)
    assert cell["kl"] is None and cell["status"] == "1 of 3 seeds: folded map"


# --- families and their stages --------------------------------------------------------------------

def test_family_points_apply_the_value_and_the_fixed_settings(params):
    train = registry.section(params, "toy2d_train")
    sweep = registry.section(params, "toy2d_sweep")
    points = family_points(sweep.families["windows"], train, "w")
    assert [(p.label, p.ma, p.student.ma, p.student.windows) for p in points] == [
        ("2", True, True, 2), ("2-noma", False, False, 2), ("8", True, True, 8), ("8-noma", False, False, 8)]
    cont = family_points(sweep.families["reflow_ma_continuous"], train, "c")
    ma = cont[0].student.ma_config(cont[0].train_cfg.ma)
    assert (ma.logdet, ma.divergence, ma.weight, ma.substeps) == ("continuous", "exact", 0.1, 4)
    weights = family_points(sweep.families["ma_weight"], train, "m")
    assert [p.student.ma_config(p.train_cfg.ma).weight for p in weights] == [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]


def test_bad_family_values_are_named(params):
    bad = copy.deepcopy(params)
    bad["toy2d_sweep"]["families"]["ma_substeps"]["values"] = [1, 0]
    with pytest.raises(ConfigError, match=r"toy2d_sweep.families.ma_substeps.values\[1\] = 0"):
        registry.validate_all(bad)
    bad = copy.deepcopy(params)
    bad["toy2d_sweep"]["families"]["windows"]["parameter"] = "lr"
    with pytest.raises(ConfigError, match="toy2d_sweep.families.windows.parameter = 'lr'"):
        registry.validate_all(bad)
    bad = copy.deepcopy(params)
    bad["toy2d_sweep"]["test_seeds"] = [100, 300]
    with pytest.raises(ConfigError, match=r"toy2d_sweep.test_seeds.*\[100\] are validation seeds"):
        registry.validate_all(bad)
    bad = copy.deepcopy(params)
    del bad["toy2d_sweep"]["families"]["windows"]
    with pytest.raises(ConfigError, match="toy2d_sweep.families"):
        registry.validate_all(bad)


def test_a_family_stage_reads_its_own_grid_only(params):
    stage = registry.stage("toy2d_sweep@windows")
    given = stage.validate(params)["toy2d_sweep"]
    assert list(given["families"]) == ["windows"]
    assert given["validation_seeds"] == params["toy2d_sweep"]["validation_seeds"]


def test_value_labels_are_folder_safe():
    assert [value_label(v) for v in (0.3, 1.0, 4, "continuous", [0.0, 0.0, 4.0])] == [
        "0.3", "1", "4", "continuous", "0-0-4"]


# --- the ablation's objective and cost ------------------------------------------------------------

def test_ma_only_objective_optimizes_lambda_times_the_ma_surrogate_alone(params):
    from marflow_core import TimeWindows
    from marflow_core.marginal import ma_surrogate
    from replication.toy2d.tier import MAOnlyObjective, build_objective, make_model, make_teacher

    toy = registry.section(params, "toy2d")
    train = registry.section(params, "toy2d_train")
    student = train.students["perflow_ma"]
    teacher = make_teacher(toy)
    objective, batch_fn = build_objective(student, train, teacher, Path("unused"), False, 0)
    model = make_model(train)
    batch = batch_fn(0, torch.Generator().manual_seed(1))
    terms = MAOnlyObjective(objective)(model, batch, 0, torch.Generator().manual_seed(2))
    got = torch.autograd.grad(terms.total, list(model.parameters()))
    wb = objective.sampler(batch, torch.Generator().manual_seed(2))
    ma = ma_surrogate(model, teacher, wb, student.ma_config(train.ma))
    want = torch.autograd.grad(train.ma.weight * ma, list(model.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert TimeWindows(student.windows).n_windows == 4


def test_step_cost_counts_matrix_product_flops_and_saved_bytes_in_closed_form():
    b, d_in, d_out = 32, 16, 8
    model = torch.nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(b, d_in)

    class Objective:
        def __call__(self, model, batch, step, generator):
            from marflow_core import LossTerms
            return LossTerms(model(batch).square().sum(), {})

    cost = step_cost(Objective(), model, x, 0, 0)
    # forward x W^T: 2 b d_in d_out; backward: the weight gradient only (x needs none): 2 b d_in d_out
    assert cost["mflops_per_step"] * 1e6 == pytest.approx(2 * 2 * b * d_in * d_out)
    # autograd saves x (for W's gradient) and the output (for the square's)
    assert cost["saved_mib_per_step"] * 2**20 == pytest.approx(4 * (b * d_in + b * d_out))
    assert model.weight.grad is None                  # the counting step leaves no gradient behind


def test_ablation_variants_are_checked(params):
    bad = copy.deepcopy(params)
    bad["toy2d_ablation"]["variants"]["ma_only"]["student"] = "perflow"
    with pytest.raises(ConfigError, match="toy2d_ablation.variants.ma_only.terms = 'ma'"):
        registry.stage("toy2d_ablation").validate(bad)
    bad = copy.deepcopy(params)
    bad["toy2d_ablation"]["n_seeds"] = 9
    with pytest.raises(ConfigError, match="toy2d_ablation.n_seeds = 9"):
        registry.stage("toy2d_ablation").validate(bad)


def test_tuned_students_take_the_selected_value(params):
    from replication.toy2d.selection import Selection, tuned_students

    train = registry.section(params, "toy2d_train")
    sweep = registry.section(params, "toy2d_sweep")
    chosen = Selection("perflow_ma", "ma_weight", "ma.weight", ["0", "0.3"], "0.3", "c", 1.0, 0.1, None, None,
                       None, [100])
    tuned = tuned_students(train, sweep.families, {"perflow_ma": chosen})
    cfg, student = tuned["perflow_ma"]
    assert student.ma_config(cfg.ma).weight == 0.3
    assert tuned["perflow"] == (train, train.students["perflow"])
    assert replace(student, seeds=[5]).seeds == [5]


def test_stages_that_read_selected_families_track_exactly_those(params):
    """``toy2d_test`` and ``toy2d_ablation`` read the families of ``toy2d_test.select`` and no other:
    dvc.yaml lists exactly those families' params (so editing another family's grid re-runs neither)
    and the test stage depends on exactly their metrics files."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    rule_families = {rule["family"] for rule in params["toy2d_test"]["select"].values()}
    for name in ("toy2d_test", "toy2d_ablation"):
        listed = {p.removeprefix("toy2d_sweep.families.") for p in stages[name]["params"]
                  if p.startswith("toy2d_sweep.families.")}
        assert listed == rule_families, name
        assert "toy2d_sweep" not in stages[name]["params"], f"{name} would re-run on any family's edit"
    metric_deps = {d.split("/")[3] for d in stages["toy2d_test"]["deps"] if d.startswith("results/toy2d/sweep/")}
    assert metric_deps == rule_families


# --- generated findings ---------------------------------------------------------------------------

def _test_cell(verdict, nfe=4, outside=False, metric="kl", delta=-1.0):
    return {"comparison": "reflow_ma - reflow", "metric": metric, "nfe": nfe, "outside_design": outside,
            "verdict": verdict, "p_value": None if verdict.startswith("untested") else 0.01,
            "p_holm": 0.02, "delta": delta, "mde": 0.5}


def test_ma_verdict_follows_its_rule_and_ignores_out_of_design_cells():
    from replication.toy2d.findings import ma_verdict

    c = "reflow_ma - reflow"
    assert ma_verdict([_test_cell("treated better"), _test_cell("no difference shown")], c) == "helps"
    assert ma_verdict([_test_cell("treated worse"), _test_cell("no difference shown")], c) == "hurts"
    assert ma_verdict([_test_cell("treated worse"), _test_cell("treated better", nfe=8)], c) == "mixed"
    assert ma_verdict([_test_cell("no difference shown"), _test_cell("untested: no spread")], c) == "no effect shown"
    assert ma_verdict([_test_cell("treated worse", nfe=1, outside=True), _test_cell("no difference shown")],
                      c) == "no effect shown"
    with pytest.raises(ValueError, match="no in-design"):
        ma_verdict([_test_cell("treated worse", outside=True)], c)


def test_reflow_answer_quotes_the_numbers_of_its_inputs():
    from replication.toy2d.findings import reflow_ma_answer

    family = {"parameter": "ma.weight", "student": "reflow_ma", "values": ["0", "0.1"], "seeds": [1, 2, 3],
              "rows": [{"value": v, "nfe": n, "ma": True, "kl": kl, "folded": f}
                       for v, f in (("0", 0.0), ("0.1", 0.25)) for n, kl in ((1, 3.5), (2, 1.25))]}
    test = {"selected": [{"student": "reflow_ma", "parameter": "ma.weight", "value": "0.1", "grid": ["0", "0.1"],
                          "criterion": "lowest", "on_grid_edge": True, "within_interval": False}],
            "comparisons": [_test_cell("treated worse", nfe=2, delta=2.5)]}
    lines = reflow_ma_answer(test, family, family)
    assert lines[0].startswith("Selected on the validation seeds: ma.weight = 0.1") and "edge of its grid" in lines[0]
    assert "MA hurts" in lines[1] and "kl@2 2.5 (treated worse, Holm p 0.02)" in lines[1]
    assert "0.1: KL 3.5 / 1.25, folded 0.25" in lines[2] and "0: KL 3.5 / 1.25, folded 0" in lines[2]
