"""The image tier's generated results: convergence criterion, class coverage, per-seed evaluation
noise, and the sentences of ``summary.md`` (each checked against the numbers it is made from)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from replication.images.config import TableConfig
from replication.images.evaluate import convergence
from replication.images.features import min_class_coverage
from replication.images.scoring import table_noise
from replication.images.summary import collapse_sentence, estimator_sentence, verdict_sentences
from replication.images.table import corrected


def test_convergence_is_zero_on_a_plateau_and_the_relative_drop_on_a_ramp():
    flat = [{"step": s, "heldout_tm": 2.0} for s in range(10, 310, 10)]
    assert convergence(flat)["heldout_tm_tail_change"] == 0.0
    # linear fall v = 300 - s over steps 10..300: the tail is steps > 200 (210..300, 10 values);
    # first half 210..250 has mean 70, second 260..300 mean 20: change (20 - 70) / 70
    ramp = [{"step": s, "heldout_tm": 300.0 - s + 10} for s in range(10, 310, 10)]
    out = convergence(ramp)
    assert out["heldout_tm_tail_change"] == pytest.approx((30 - 80) / 80)
    assert out["heldout_tm_final"] == 10.0 and out["heldout_tm_min"] == 10.0


def test_convergence_refuses_a_history_without_the_key_and_says_nan_with_too_few_points():
    with pytest.raises(ValueError, match="heldout_tm"):
        convergence([{"step": 1, "tm": 1.0}])
    out = convergence([{"step": s, "heldout_tm": 1.0} for s in (100, 200, 300)])
    assert math.isnan(out["heldout_tm_tail_change"]) and out["heldout_tm_final"] == 1.0


def test_min_class_coverage_is_the_least_covered_class_relative_share():
    q = torch.tensor([0.5, 0.25, 0.25, 0.0])
    p = torch.tensor([0.6, 0.3, 0.05, 0.05])
    assert min_class_coverage(p, q) == pytest.approx(0.2)  # class 2: 0.05 / 0.25; class 3 has no share
    assert min_class_coverage(q, q) == pytest.approx(1.0)


def test_each_training_seed_has_its_own_evaluation_noise():
    cfg = TableConfig()
    a, b = table_noise(cfg, 0, 16, (1, 4, 4)), table_noise(cfg, 1, 16, (1, 4, 4))
    assert torch.equal(a, table_noise(cfg, 0, 16, (1, 4, 4)))  # same seed: same draw (paired students)
    assert not torch.allclose(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.3


def _family(deltas: dict[tuple[int, str], list[float]]) -> pd.DataFrame:
    rows = [{"nfe": nfe, "metric": metric, "delta": sum(d) / len(d), "ci95": 0.0, "seeds": len(d),
             "verdict": "", "differences": d, "comparison": "perflow_ma - perflow"}
            for (nfe, metric), d in deltas.items()]
    return corrected(pd.DataFrame(rows))


def test_verdict_sentences_follow_the_holm_verdicts():
    family = _family({(4, "kl"): [-10.0, -11.0, -9.5, -10.5, -10.2],        # clearly lower: MA better
                      (4, "domain_recall_teacher"): [0.01, -0.02, 0.0, 0.015, -0.01],  # nothing
                      (8, "class_mass_error"): [0.05, 0.051, 0.049, 0.05, 0.052]})      # higher: MA worse
    assert list(family.verdict_holm[:1]) == ["MA better"]
    four, eight = verdict_sentences(family, "perflow_ma - perflow", [2, 4, 8])
    assert four.startswith("4 NFE: **MA helps**") and "MA better: kl" in four
    assert "not detected: domain_recall_teacher" in four and "MDE" in four
    assert eight.startswith("8 NFE: **MA hurts**") and "MA worse: class_mass_error" in eight


def test_estimator_sentence_states_the_distance_from_zero_in_standard_errors():
    rows = pd.DataFrame([{"method": "teacher (CNF)", "kl": -2.1, "kl_stderr": 0.7, "kl_refined": -0.9,
                          "kl_refined_stderr": 0.7}])
    text = estimator_sentence(rows, 24, 48)
    assert "-2.10 ± 0.70" in text and "3.0 standard errors from 0" in text
    assert "-0.90 ± 0.70 with 48 steps, within 2 standard errors of 0" in text


def test_collapse_sentence_flags_a_student_without_coverage():
    summary = pd.DataFrame([
        {"method": "reflow", "nfe": 1, "domain_recall_teacher": 0.8, "class_coverage": 0.7},
        {"method": "reflow", "nfe": 4, "domain_recall_teacher": 0.85, "class_coverage": 0.8},
        {"method": "reflow_ma", "nfe": 1, "domain_recall_teacher": 0.05, "class_coverage": 0.0},
        {"method": "reflow_ma", "nfe": 4, "domain_recall_teacher": 0.6, "class_coverage": 0.5}])
    text = collapse_sentence(summary, "reflow_ma", "reflow")
    assert text.startswith("reflow_ma collapses at 1 NFE (")
    ok = collapse_sentence(summary[summary.nfe == 4], "reflow_ma", "reflow")
    assert ok.startswith("reflow_ma does not collapse at any NFE")


def test_differences_without_spread_are_left_untested_not_significant():
    """Identical differences (a quantized metric) have no t statistic: never counted significant."""
    family = _family({(1, "domain_recall_teacher"): [-0.03, -0.03],
                      (4, "kl"): [-10.0, -11.0, -9.5, -10.5, -10.2]})
    assert list(family.verdict_holm) == ["no spread: untested", "MA better"]
    assert family.p_value.isna().tolist() == [True, False]
