"""``python -m replication.reproduce_check``: a run against its committed copy, on small fake
metrics written to tmp folders (never the real results). Every bound is worked out by hand here:
``|a - b| <= z * sqrt(se_a**2 + se_b**2)``, a 95% half-width over 5 seeds is ``t(0.975, 4) =
2.7764451051977987`` standard errors (the t table), a float without an error agrees to 1e-6
relative."""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest

from replication import reproduce_check as rc

T975_4 = 2.7764451051977987  # Student-t 97.5% quantile, 4 degrees of freedom (table value)


def _metrics(kl: float = 1.0, kl_se: float = 0.03) -> dict:
    """A fake 2-D-style metrics file: counts, a table with stated errors, a float without one."""
    return {"n_samples": 1000,
            "noise_floor": {"mmd2": 0.001},
            "table": [{"method": "a", "nfe": 1, "kl": kl, "kl_se": kl_se, "tv": 0.5, "tv_se": 0.01,
                       "status": "ok"},
                      {"method": "b", "nfe": 1, "kl": 2.0, "kl_se": 0.05, "tv": 0.7, "tv_se": 0.01,
                       "status": "ok"}]}


def _test_row(**change) -> dict:
    """A fake paired test (images-tier layout): delta with its 95% half-width over 5 seeds."""
    row = {"comparison": "perflow_ma - perflow", "metric": "domain_fd_teacher", "nfe": 4, "seeds": 5,
           "delta": 42.3, "ci95": 30.0, "differences": [10.0, 20.0, 40.0, 60.0, 81.5],
           "p_value": 0.02, "p_holm": 0.184, "mde": 74.3, "verdict": "MA worse",
           "verdict_holm": "not detected (MDE 74.3)"}
    return row | change


SUMMARY = ("**Does MA help PeRFlow?** ...\n\n"
           "- 1 NFE: **MA hurts**; MA worse: domain_fd_teacher (+234, Holm p 0.00068).\n"
           "- 4 NFE: **no effect detected**; not detected: domain_fd_teacher (+42.3, MDE 74.3).\n\n"
           "reflow_ma collapses at 1, 2 NFE (collapse: ...): 1 NFE recall 0.00 (vs 0.92).\n")


def _write(root: Path, files: dict[str, object]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return root


def _check(tmp_path: Path, run: dict, committed: dict, *extra: str) -> tuple[int, str, dict]:
    """Run the command on two fake results folders; (exit status, stdout, --json document)."""
    _write(tmp_path / "run", run)
    _write(tmp_path / "committed", committed)
    out = tmp_path / "out.json"
    code, text = _main(["--results", str(tmp_path / "run"), "--against-dir", str(tmp_path / "committed"),
                        "--json", str(out), *extra])
    return code, text, json.loads(out.read_text()) if out.exists() else {}


def _main(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = rc.main(argv)
    return code, buf.getvalue()


def _file(doc: dict, name: str) -> dict:
    return next(f for f in doc["files"] if f["file"] == name)


def _value(doc: dict, name: str, path: str) -> dict:
    return next(v for v in _file(doc, name)["values"] if v["path"] == path)


F = "toy2d/x/metrics.json"


def test_identical_runs_are_reproduced(tmp_path):
    files = {F: _metrics(), "images/table/metrics.json": {"paired_tests_holm": [_test_row()]},
             "images/table/summary.md": SUMMARY}
    code, text, doc = _check(tmp_path, files, copy.deepcopy(files))
    assert code == 0
    assert doc["overall"] == "reproduced"
    assert {f["status"] for f in doc["files"]} == {"reproduced"}
    counts = _file(doc, F)["counts"]
    assert counts["numbers"] == counts["identical"] == 12   # n_samples, mmd2, 2 rows x (nfe, kl, kl_se, tv, tv_se)
    assert (counts["with error"], counts["no stated error"]) == (4, 1)
    assert "overall: reproduced" in text


def test_counts_what_carries_an_error():
    walk = rc.compare_metrics(F, _metrics(), _metrics(), rc.Rules())
    kinds = {i.path: i.kind for i in walk.items}
    assert kinds["table[method=a, nfe=1].kl"] == "stated error"
    assert kinds["table[method=a, nfe=1].kl_se"] == "error bar"
    assert kinds["noise_floor.mmd2"] == "no stated error"
    assert kinds["n_samples"] == "exact" and kinds["table[method=a, nfe=1].nfe"] == "exact"
    assert [v.where for v in walk.verdicts] == ["table[method=a, nfe=1].status", "table[method=b, nfe=1].status"]


def test_change_within_the_stated_error_is_reproduced(tmp_path):
    # bound 3 * sqrt(0.03^2 + 0.04^2) = 3 * 0.05 = 0.15 >= |1.10 - 1.00|
    code, text, doc = _check(tmp_path, {F: _metrics(1.10, 0.04)}, {F: _metrics(1.0, 0.03)})
    assert code == 0, text
    item = _value(doc, F, "table[method=a, nfe=1].kl")
    assert item["outcome"] == "within error"
    assert item["bound"] == pytest.approx(0.15, rel=1e-12)
    assert _file(doc, F)["counts"]["within error"] == 1


def test_change_outside_the_stated_error_names_the_key(tmp_path):
    # |1.16 - 1.00| = 0.16 > 0.15
    code, text, doc = _check(tmp_path, {F: _metrics(1.16, 0.04)}, {F: _metrics(1.0, 0.03)})
    assert code == 1
    assert _file(doc, F)["status"] == "not reproduced"
    assert "table[method=a, nfe=1].kl: 1.16 (run) vs 1 (committed)" in text
    assert "outside their stated error" in text
    assert _value(doc, F, "table[method=a, nfe=1].kl")["outcome"] == "outside error"


@pytest.mark.parametrize(("z", "run", "expected"), [
    (3.0, 1.149, "within error"), (3.0, 1.151, "outside error"),   # bound 0.15
    (2.0, 1.099, "within error"), (2.0, 1.101, "outside error"),   # bound 0.10
    (1.0, 0.951, "within error"), (1.0, 0.949, "outside error"),   # bound 0.05, the other side
])
def test_the_z_rule_against_a_hand_computation(z, run, expected):
    rules = rc.Rules(z=z)
    report = rc.compare_metrics(F, _metrics(run, 0.04), _metrics(1.0, 0.03), rules)
    item = next(i for i in report.items if i.path == "table[method=a, nfe=1].kl")
    assert item.bound == pytest.approx(z * math.sqrt(0.03 ** 2 + 0.04 ** 2))
    assert item.outcome == expected


@pytest.mark.parametrize(("run_delta", "expected"), [(42.3 + 0.42, "within error"), (42.3 + 0.43, "outside error")])
def test_a_95_half_width_is_turned_into_a_standard_error_with_the_t_quantile(run_delta, expected):
    # ci95 = 0.1 * t(0.975, 4) over 5 seeds is an SE of 0.1 on both sides: bound 3 * sqrt(0.02) = 0.42426
    half = 0.1 * T975_4
    report = rc.compare_metrics("m.json", {"t": [_test_row(delta=run_delta, ci95=half)]},
                                {"t": [_test_row(ci95=half)]}, rc.Rules())
    item = next(i for i in report.items if i.key == "delta")
    assert item.se_run == pytest.approx(0.1, rel=1e-9) and item.se_committed == pytest.approx(0.1, rel=1e-9)
    assert item.bound == pytest.approx(3 * math.sqrt(0.02), rel=1e-9)
    assert item.outcome == expected


def test_a_float_without_an_error_is_checked_to_one_part_in_a_million(tmp_path):
    committed = _metrics()
    for factor, outcome, code in ((1 + 5e-7, "within tolerance", 0), (1 + 2e-6, "outside tolerance", 1)):
        run = _metrics()
        committed["noise_floor"]["mmd2"] = 1.0
        run["noise_floor"]["mmd2"] = 1.0 * factor
        got, text, doc = _check(tmp_path / outcome.replace(" ", "_"), {F: run}, {F: committed})
        item = _value(doc, F, "noise_floor.mmd2")
        assert (item["kind"], item["outcome"], got) == ("no stated error", outcome, code)
        assert item["bound"] == pytest.approx(1e-9 + 1e-6 * factor)
    assert "without a stated error differ (strict check)" in text


def test_a_number_that_is_zero_up_to_rounding_agrees_with_another_such(tmp_path):
    """The FID of a set with itself: -1.1e-10 on one machine, -4.5e-12 on the next."""
    committed, run = _metrics(), _metrics()
    committed["noise_floor"]["mmd2"], run["noise_floor"]["mmd2"] = -1.0913936e-10, -4.547e-12
    got, _, doc = _check(tmp_path / "zero", {F: run}, {F: committed})
    assert (_value(doc, F, "noise_floor.mmd2")["outcome"], got) == ("within tolerance", 0)
    run["noise_floor"]["mmd2"] = 3e-9
    got, _, doc = _check(tmp_path / "not_zero", {F: run}, {F: committed})
    assert (_value(doc, F, "noise_floor.mmd2")["outcome"], got) == ("outside tolerance", 1)


def test_a_changed_sample_count_is_not_comparable(tmp_path):
    run = _metrics()
    run["n_samples"] = 2000
    code, text, doc = _check(tmp_path, {F: run}, {F: _metrics()})
    assert code == 1
    assert _file(doc, F)["status"] == "not comparable"
    assert _value(doc, F, "n_samples")["status"] == "not comparable"
    assert "n_samples: 2000 (run) vs 1000 (committed)" in text


def test_a_seed_count_stored_as_a_float_is_a_count():
    a, b = {"s": [{"method": "m", "nfe": 1, "fid": 1.0, "fid_seeds": 5.0}]}, {"s": [{"method": "m", "nfe": 1, "fid": 1.0, "fid_seeds": 4.0}]}
    item = next(i for i in rc.compare_metrics("m.json", a, b, rc.Rules()).items if i.key == "fid_seeds")
    assert (item.kind, item.status) == ("exact", "not comparable")


def test_a_flipped_verdict_with_agreeing_numbers_depends_on_the_machine(tmp_path):
    one = {"nfe": 1, "delta": 234.0, "p_holm": 0.0007, "verdict_holm": "MA worse"}
    committed = {"images/table/metrics.json": {"paired_tests_holm": [_test_row(), _test_row(**one)]},
                 "images/table/summary.md": SUMMARY}
    # the same test on another machine: delta moves by 0.4 (its bound: 3 * sqrt(2) * 30 / t = 45.8),
    # the Holm p-value crosses 0.05, the MDE moves in its last digits; at 1 NFE the delta moves far
    # beyond its error (234 -> 100) and that verdict flips too
    run = {"images/table/metrics.json": {"paired_tests_holm": [
               _test_row(delta=42.7, p_holm=0.049, mde=74.5, verdict_holm="MA worse"),
               _test_row(**one | {"delta": 100.0, "p_holm": 0.2, "verdict_holm": "not detected (MDE 74.3)"})]},
           "images/table/summary.md": SUMMARY.replace("4 NFE: **no effect detected**", "4 NFE: **MA hurts**")
           .replace("1 NFE: **MA hurts**", "1 NFE: **no effect detected**")}
    code, text, doc = _check(tmp_path, run, committed)
    assert code == 1
    test = next(v for v in _file(doc, "images/table/metrics.json")["verdicts"]
                if v["where"].endswith("nfe=4].verdict_holm"))
    assert test["status"] == "depends on the machine"
    assert test["within_power"] is True
    assert "straddle the level 0.05" in test["why"] and "< MDE 74.5 (run)" in test["why"]
    nfe4 = next(v for v in _file(doc, "images/table/summary.md")["verdicts"] if v["where"] == "MA verdict at 4 NFE")
    assert (nfe4["committed"], nfe4["run"], nfe4["status"]) == ("no effect detected", "MA hurts", "depends on the machine")
    assert "verdict MA verdict at 4 NFE: 'no effect detected' (committed) -> 'MA hurts' (run): depends on the machine" in text
    nfe1 = next(v for v in _file(doc, "images/table/summary.md")["verdicts"] if v["where"] == "MA verdict at 1 NFE")
    assert nfe1["status"] == "not reproduced" and "disagree beyond their errors" in nfe1["why"]
    collapse = next(v for v in _file(doc, "images/table/summary.md")["verdicts"] if "collapses" in v["where"])
    assert collapse["status"] == "reproduced"


def test_a_flipped_verdict_whose_numbers_disagree_is_not_reproduced(tmp_path):
    # delta 42.3 -> 100: |diff| 57.7 > 3 * sqrt(2) * 30 / t(0.975, 4) = 45.84
    run = {"m/metrics.json": {"t": [_test_row(delta=100.0, p_holm=0.01, verdict_holm="MA worse")]}}
    code, _, doc = _check(tmp_path, run, {"m/metrics.json": {"t": [_test_row()]}})
    verdict = next(v for v in _file(doc, "m/metrics.json")["verdicts"] if v["where"].endswith("verdict_holm"))
    assert verdict["status"] == "not reproduced" and code == 1
    assert "disagree beyond their errors" in verdict["why"]


def test_a_verdict_differing_only_in_its_numbers_is_the_same_verdict():
    report = rc.compare_metrics("m.json", {"t": [_test_row(mde=74.5, verdict_holm="not detected (MDE 74.5)")]},
                                {"t": [_test_row()]}, rc.Rules())
    assert [v.status for v in report.verdicts] == ["reproduced", "reproduced"]


def test_a_missing_file_is_reported_on_either_side(tmp_path):
    committed = {F: _metrics(), "toy2d/y/metrics.json": _metrics()}
    run = {F: _metrics(), "toy2d/z/metrics.json": _metrics()}
    code, text, doc = _check(tmp_path, run, committed)
    assert code == 1
    assert _file(doc, "toy2d/y/metrics.json")["why"] == ["missing in the run (working tree)"]
    assert _file(doc, "toy2d/z/metrics.json")["why"] == ["missing in the committed results"]
    assert _file(doc, F)["status"] == "reproduced"
    assert "toy2d/y/metrics.json: missing" in text


def test_rows_match_by_their_labels_and_a_missing_row_is_reported():
    committed = _metrics()
    reordered = _metrics()
    reordered["table"].reverse()
    assert {i.status for i in rc.compare_metrics(F, reordered, committed, rc.Rules()).items} == {"reproduced"}
    fewer = _metrics()
    fewer["table"].pop()
    items = rc.compare_metrics(F, fewer, committed, rc.Rules()).items
    assert [(i.path, i.outcome, i.status) for i in items if i.status != "reproduced"] == [
        ("table[method=b, nfe=1]", "only in committed", "not comparable")]


def test_an_error_bar_that_changes_more_than_twofold_is_not_reproduced():
    # kl 1.0 vs 1.0 agrees, but its SE goes 0.03 -> 0.061 (ratio 2.03 > 2)
    report = rc.compare_metrics(F, _metrics(1.0, 0.061), _metrics(1.0, 0.03), rc.Rules())
    bar = next(i for i in report.items if i.path == "table[method=a, nfe=1].kl_se")
    assert (bar.kind, bar.status) == ("error bar", "not reproduced")
    ok = rc.compare_metrics(F, _metrics(1.0, 0.059), _metrics(1.0, 0.03), rc.Rules())
    assert next(i for i in ok.items if i.path == "table[method=a, nfe=1].kl_se").status == "reproduced"


def test_a_value_null_in_one_run_is_not_reproduced():
    run = _metrics()
    run["table"][0]["tv"] = None
    item = next(i for i in rc.compare_metrics(F, run, _metrics(), rc.Rules()).items
                if i.path == "table[method=a, nfe=1].tv")
    assert (item.outcome, item.status) == ("null in one run", "not reproduced")


def test_bad_input_exits_2(tmp_path, capsys):
    assert _main(["--results", str(tmp_path / "nosuch"), "--against-dir", str(tmp_path)])[0] == 2
    assert "no such folder" in capsys.readouterr().err
    _write(tmp_path / "run", {F: "{not json"})
    _write(tmp_path / "committed", {F: _metrics()})
    assert _main(["--results", str(tmp_path / "run"), "--against-dir", str(tmp_path / "committed")])[0] == 2
    assert "toy2d/x/metrics.json" in capsys.readouterr().err
    assert _main(["--results", str(tmp_path / "committed"), "--against-dir", str(tmp_path / "committed"),
                  "--z", "0"])[0] == 2


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_against_a_git_commit(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    _write(repo / "results", {F: _metrics()})
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "results")
    monkeypatch.chdir(repo)
    assert _main([])[0] == 0                                     # --results results --against HEAD
    _write(repo / "results", {F: _metrics(1.16, 0.04)})          # outside: 0.16 > 0.15
    code, text = _main(["--against", "HEAD"])
    assert code == 1 and "table[method=a, nfe=1].kl" in text
    assert _main(["--against", "nosuch"])[0] == 2


def test_a_collapse_flip_whose_numbers_carry_no_error_is_not_reproduced(tmp_path):
    # one seed: the recall behind the collapse sentence has no stated error (ci95 null)
    def table(recall: float) -> dict:
        return {"summary": [{"method": "reflow_ma", "nfe": 2, "domain_recall_teacher": recall,
                             "domain_recall_teacher_ci95": None, "domain_recall_teacher_seeds": 1.0}]}

    run = {"i/metrics.json": table(0.11), "i/summary.md": SUMMARY.replace("collapses at 1, 2 NFE", "collapses at 1 NFE")}
    code, _, doc = _check(tmp_path, run, {"i/metrics.json": table(0.09), "i/summary.md": SUMMARY})
    collapse = next(v for v in _file(doc, "i/summary.md")["verdicts"] if "collapses" in v["where"])
    assert (collapse["committed"], collapse["run"]) == ([1, 2], [1])
    assert collapse["status"] == "not reproduced" and "no number behind it carries a stated error" in collapse["why"]
    assert code == 1
