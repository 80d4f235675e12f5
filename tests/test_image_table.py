"""The image table's statistics: seed intervals, paired +MA deltas and their verdicts, aggregation,
and the samplers' counted network evaluations."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from marflow_core import TimeWindows
from replication.common.stats import paired_delta, seed_interval
from replication.images.evaluate import CountingField, adaptive_teacher_samples, few_step_samples
from replication.images.table import aggregate, formatted, ma_deltas, verdict

T975 = {1: 12.706204736174705, 2: 4.302652729749464, 3: 3.182446305284263}  # t_{0.975, df} tables


def test_seed_interval_is_the_student_t_interval():
    values = [1.0, 2.0, 4.0]
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    iv = seed_interval(values)
    assert iv.mean == pytest.approx(mean)
    assert iv.half_width == pytest.approx(T975[2] * sd / math.sqrt(3))
    assert iv.n == 3
    one = seed_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.half_width) and "1 seed" in str(one)
    with pytest.raises(ValueError):
        seed_interval([])


def test_paired_delta_uses_only_common_seeds_and_pairs_them():
    treated = {0: 10.0, 1: 12.0, 2: 11.0, 7: 100.0}
    control = {0: 11.0, 1: 12.5, 2: 13.0, 9: -100.0}
    iv = paired_delta(treated, control)
    diffs = [-1.0, -0.5, -2.0]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    assert iv.mean == pytest.approx(m) and iv.n == 3
    assert iv.half_width == pytest.approx(T975[2] * sd / math.sqrt(3))
    # unpaired, the seed-to-seed spread would swamp the effect; paired, it does not
    assert iv.half_width < seed_interval(list(control.values())[:3]).half_width
    with pytest.raises(ValueError, match="no common seeds"):
        paired_delta({0: 1.0}, {1: 1.0})


def test_verdicts():
    iv = seed_interval([-1.0, -1.1, -0.9])
    assert verdict(iv, lower_better=True) == "MA better"
    assert verdict(iv, lower_better=False) == "MA worse"
    assert verdict(seed_interval([-1.0, 1.0, 0.1]), True) == "no difference shown"
    assert verdict(seed_interval([-1.0]), True) == "one seed: no interval"


def test_aggregate_and_deltas_on_a_hand_made_table():
    rows = pd.DataFrame([
        {"method": "perflow", "seed": s, "nfe": 4, "fid": f, "kl": k}
        for s, f, k in ((0, 10.0, 1.0), (1, 12.0, 1.2), (2, 14.0, 1.1))] + [
        {"method": "perflow_ma", "seed": s, "nfe": 4, "fid": f, "kl": k}
        for s, f, k in ((0, 9.0, 0.5), (1, 11.5, 0.7), (2, 12.0, 0.6))] + [
        {"method": "teacher", "seed": -1, "nfe": 50, "fid": 3.0, "kl": None}])
    summary = aggregate(rows, ["fid", "kl"])
    pf = summary[summary.method == "perflow"].iloc[0]
    assert pf.fid == pytest.approx(12.0) and pf.fid_seeds == 3
    assert pf.fid_ci95 == pytest.approx(T975[2] * 2.0 / math.sqrt(3))
    teacher = summary[summary.method == "teacher"].iloc[0]
    assert teacher.fid == 3.0 and teacher.fid_seeds == 1 and pd.isna(teacher.get("kl_seeds"))
    shown = formatted(summary, ["fid", "kl"])
    assert shown.loc[shown.method == "teacher", "fid"].iloc[0] == "3 (1 seed)"
    deltas = ma_deltas(rows, "perflow_ma", "perflow", ["fid", "kl"]).set_index("metric")
    assert deltas.loc["fid", "delta"] == pytest.approx((-1.0 - 0.5 - 2.0) / 3)
    assert deltas.loc["kl", "delta"] == pytest.approx(-0.5)
    assert deltas.loc["kl", "ci95"] == pytest.approx(0.0, abs=1e-12)
    assert deltas.loc["kl", "verdict"] == "MA better"


def test_samplers_count_network_evaluations():
    a = torch.tensor([[-0.5, 0.0], [0.0, -0.25]])
    field = CountingField(lambda x, t: x @ a.T)
    x0 = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    out = few_step_samples(field, TimeWindows(4), 4, x0, batch=4)
    assert field.calls == 4 * 3  # 4 Euler steps per chunk, 3 chunks
    assert torch.allclose(out, x0 @ torch.linalg.matrix_power(torch.eye(2) + a.T / 4, 4), atol=1e-6)
    exact, nfe = adaptive_teacher_samples(lambda x, t: x @ a.T.double(), x0.double(), "dopri5", 1e-8,
                                          1e-8)
    assert torch.allclose(exact, x0.double() @ torch.linalg.matrix_exp(a.T.double()), atol=1e-6)
    assert nfe > 6  # dopri5 evaluates at least 6 stages per step


def test_rows_with_fewer_steps_than_windows_are_marked():
    import pandas as pd

    from replication.images.table import mark_off_design

    rows = pd.DataFrame({"method": ["perflow", "perflow", "reflow", "teacher"], "nfe": [2, 4, 1, 68],
                         "seed": [0, 0, 0, -1]})
    marked = mark_off_design(rows, {"perflow": 4, "reflow": 1})
    assert marked.fewer_steps_than_windows.tolist() == [True, False, False, False]
    assert "fewer_steps_than_windows" not in rows  # the input is left as it was


def test_a_family_of_paired_deltas_is_holm_corrected_with_its_mde():
    """Two metrics x one NFE: the raw p-values by hand (t-tests on the per-seed differences), Holm
    over the family of 2, and verdicts that follow the adjusted p only."""
    from scipy import stats

    from replication.common.testing import minimum_detectable_effect
    from replication.images.table import corrected

    rows = pd.DataFrame(
        [{"method": "perflow", "seed": s, "nfe": 4, "fid": 10.0 + s, "kl": 1.0 + 0.1 * s} for s in range(5)]
        + [{"method": "perflow_ma", "seed": s, "nfe": 4, "fid": 10.0 + s + d, "kl": 1.0 + 0.1 * s - 0.5 + e}
           for s, d, e in zip(range(5), (0.3, -0.2, 0.1, -0.4, 0.2), (0.01, -0.02, 0.0, 0.02, -0.01), strict=True)])
    out = corrected(ma_deltas(rows, "perflow_ma", "perflow", ["fid", "kl"])).set_index("metric")
    for metric in ("fid", "kl"):
        d = out.loc[metric, "differences"]
        p = stats.ttest_1samp(d, 0.0).pvalue
        assert out.loc[metric, "p_value"] == pytest.approx(p, rel=1e-9)
    p_fid, p_kl = out.loc["fid", "p_value"], out.loc["kl", "p_value"]
    assert p_kl < p_fid
    assert out.loc["kl", "p_holm"] == pytest.approx(min(1, 2 * p_kl))
    assert out.loc["fid", "p_holm"] == pytest.approx(max(min(1, 2 * p_kl), min(1, p_fid)))
    assert out.loc["kl", "verdict_holm"] == "MA better"
    assert out.loc["fid", "verdict_holm"].startswith("not detected (MDE ")
    sd = pd.Series(out.loc["fid", "differences"]).std()
    assert out.loc["fid", "mde"] == pytest.approx(minimum_detectable_effect(sd, 5, 0.05 / 2))
