"""Smoke runs of the DVC pipeline on the tiny profile, one tier per test, in a temporary git copy of
the repository.

The 2-D tier: the first `dvc repro` is SIGKILLed (with its whole process group) once a training
checkpoint exists, and run again: it resumes. Then: every stage ran with no error cells and wrote
every declared output; what the notebooks claim holds wherever it must hold on any profile
(recomputed here from the numbers in their metrics, not read from a flag the code under test sets);
a second `dvc repro` has nothing to do; and `python -m replication.retrain` (delete the checkpoints,
then `dvc repro -f`: every notebook re-executed, every student trained from scratch) leaves the
committed tree byte-identical, checkpoint hashes in dvc.lock included: the killed and resumed
training equals an uninterrupted one. The image tier: its outputs and the table's claims, a no-op
rerun, `dvc status` clean, and a forced re-evaluation of the table that changes no byte (its
training's kill-and-resume identity is `test_reliability.py`'s).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from replication.config import load_params
from replication.registry import tiers

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=marflow-test", "-c", "user.email=test@invalid", "-c",
       "commit.gpgsign=false"]


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _kill_during_training(repo: Path, stages: list[str]) -> None:
    """Start `dvc repro` of ``stages``, SIGKILL its process group once a checkpoint exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(["dvc", "repro", *stages], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(repo.glob("checkpoints/**/last.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "dvc repro ended before any checkpoint was written"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(3)  # the notebook kernel notices its parent is gone and exits
    alive = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True).stdout.split()
    assert not alive, f"processes of the killed run are still alive: {alive}"


def _metrics(repo: Path, rel: str) -> dict:
    return json.loads((repo / rel).read_text())


def _dvc_stages(repo: Path) -> dict:
    """dvc.yaml's stages with ``foreach`` expanded (``NAME@ITEM``, ``${item}`` filled in)."""
    from test_config_validation import expand_foreach

    return expand_foreach(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def _check_outputs(repo: Path, names: list[str]) -> None:
    stages = _dvc_stages(repo)
    for name, stage in ((n, stages[n]) for n in names):
        for out in stage["outs"]:
            path = repo / (out if isinstance(out, str) else next(iter(out)))
            assert path.exists(), f"{name}: missing output {path}"
            if path.suffix == ".ipynb":
                nb = nbformat.read(path, as_version=4)
                errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                          if o.get("output_type") == "error"]
                assert not errors, f"{path.name} has error cells: {errors[0].get('ename')}"
        for entry in stage.get("metrics", []):
            assert _metrics(repo, next(iter(entry))), f"{name}: empty metrics"
        for entry in stage.get("plots", []):
            plot = repo / next(iter(entry))
            if plot.suffix == ".png":
                assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{plot} is not a PNG"
            else:  # a data plot (dvc plots show renders it): a header and at least one row
                assert len(plot.read_text().splitlines()) >= 2, f"{plot} has no rows"


def _check_claims(repo: Path, params: dict) -> None:
    """What the notebooks state that must hold on any profile, recomputed from their numbers."""
    students = params["toy2d_train"]["students"]
    fig1 = _metrics(repo, "results/toy2d/fig1_mog/metrics.json")
    assert {(r["student"], r["nfe"]) for r in fig1["table"]} == {
        (s, n) for s in students for n in params["toy2d_eval"]["nfe"]}
    for r in fig1["table"]:
        assert 0.0 <= r["tv"] <= 1.0 and 0.0 <= r["folded"] <= 1.0 and 0.0 <= r["off_mode"] <= 1.0
        assert r["kl"] >= -3 * r["kl_se"], r  # a KL is >= 0 up to Monte-Carlo error
        assert r["tv"] <= math.sqrt(max(r["kl"], 0) / 2) + 3 * (r["tv_se"] + r["kl_se"]) or r["folded"] > 0
    assert fig1["n_samples"] == params["toy2d_eval"]["n_samples"]

    # TV bound: data processing and Pinsker, term by term, for every student
    tv = _metrics(repo, "results/toy2d/tv_bound/metrics.json")
    for row in tv["summary"]:
        k = students[row["student"]]["windows"]
        windows = [w for w in tv["windows"] if w["student"] == row["student"]]
        assert [w["window"] for w in windows] == list(range(k))
        assert row["sum_local_tv"] == pytest.approx(sum(w["local_tv"] for w in windows))
        pinsker = sum(math.sqrt(max(w["local_kl"], 0) / 2) for w in windows)
        assert row["pinsker_local_kl"] == pytest.approx(pinsker)
        slack = 2 * math.hypot(row["final_tv_se"], row["sum_local_tv_se"])
        assert row["final_tv"] <= row["sum_local_tv"] + slack, row
        slack = 2 * math.hypot(row["sum_local_tv_se"], row["pinsker_local_kl_se"])
        assert row["sum_local_tv"] <= row["pinsker_local_kl"] + slack, row
    sampler_checks = [c for c in tv["checks"] if c["name"].startswith("sampler")]
    assert sampler_checks and all(c["holds"] for c in sampler_checks)

    # under-determination: equal matching errors, the rotated student keeps the teacher's marginal
    ud = {r["student"]: r for r in _metrics(repo, "results/toy2d/underdetermination/metrics.json")["analytic"]}
    teacher, rotated, shifted = ud["teacher T"], ud["rotated T(R x0)"], ud["shifted T(x0) + c"]
    assert teacher["matching_error"] == 0.0 and rotated["matching_error"] > 0
    assert shifted["matching_error"] == pytest.approx(rotated["matching_error"], rel=1e-5)
    assert abs(rotated["kl"] - teacher["kl"]) <= 4 * math.hypot(rotated["kl_se"], teacher["kl_se"])
    assert shifted["kl"] > rotated["kl"] + 5 * math.hypot(shifted["kl_se"], rotated["kl_se"])
    snaps = _metrics(repo, "results/toy2d/underdetermination/metrics.json")["snapshots"]
    train = params["toy2d_train"]
    per_student = train["steps"] // train["snapshot_every"]
    assert len(snaps) == per_student * len(params["underdetermination"]["students"])
    pair = _metrics(repo, "results/toy2d/underdetermination/metrics.json")["closest_pair"]
    if pair is not None:
        assert abs(pair["tm_difference"]) <= pair["within_se"] * pair["tm_difference_paired_se"]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> tuple[Path, dict]:
    """One scratch copy of the project on the tiny profile, shared by the tiers' smoke runs (each
    runs only its own tier's stages; the tiers share no stage and no output)."""
    if shutil.which("git") is None or shutil.which("dvc") is None:
        pytest.fail("git and dvc must be installed (see README)")
    repo = tmp_path_factory.mktemp("smoke") / "repo"
    _run([sys.executable, "-m", "replication.profile", "tiny", "--scratch", str(repo)], ROOT)
    assert (repo / "params.yaml").read_text() != (ROOT / "params.yaml").read_text()
    assert not (ROOT / "params.yaml").read_text().count("profile: tiny")  # the work tree is untouched
    return repo, load_params(repo / "params.yaml", profiles_dir=repo / "replication" / "profiles")


#: the 2-D tier's analysis stages (sweeps, sensitivity, test table, ablation): smoke-run by
#: ``test_tiny_profile_analysis_stages``, not retrained by the end-to-end test
ANALYSIS = ("toy2d_sweep@", "toy2d_sensitivity", "toy2d_test", "toy2d_ablation", "toy2d_related")


def _tier_stages(tier: str, analysis: bool = False) -> list[str]:
    names = [s.name for s in tiers()[tier].stages]
    return [n for n in names if n.startswith(ANALYSIS) == analysis]


@pytest.mark.slow
def test_tiny_profile_pipeline_end_to_end(tiny_repo):
    """The 2-D tier's stages: killed and resumed, claims, no-op rerun, `repro -f` and retrain clean."""
    repo, params = tiny_repo
    stages = _tier_stages("toy2d")

    _kill_during_training(repo, stages)
    _run(["dvc", "repro", *stages], repo)
    assert not list(repo.glob("results/**/.*.tmp-*")) and not list(repo.glob("checkpoints/**/.*.tmp"))
    _check_outputs(repo, stages)
    _check_claims(repo, params)

    again = _run(["dvc", "repro", *stages], repo)
    assert "Running stage" not in again.stdout, again.stdout

    _run([*GIT, "add", "-A"], repo)
    _run([*GIT, "commit", "-qm", "first run"], repo)
    # retrain = delete the checkpoints, then `dvc repro -f`: every notebook re-executed, every
    # student trained anew, and not one committed byte (dvc.lock's checkpoint hashes included) moves
    retrained = _run([sys.executable, "-m", "replication.retrain", "--tier", "toy2d",
                      *(arg for name in stages for arg in ("--stage", name))], repo)
    assert retrained.stdout.count("Running stage") == len(stages), retrained.stdout
    dirty = _run(["git", "status", "--porcelain"], repo).stdout
    assert dirty == "", f"retraining from scratch changed the committed tree:\n{dirty}"
    status = _run(["dvc", "status", *stages], repo)
    assert "up to date" in status.stdout, status.stdout


def _check_image_claims(repo: Path, params: dict) -> None:
    """What the image tier's table states that must hold on any profile, from its numbers."""
    table = _metrics(repo, "results/images/table/metrics.json")
    cfg, students = params["table_images"], params["images_students"]["students"]
    rows = table["rows"]
    runs = {(r["method"], r["seed"], r["nfe"]) for r in rows}
    expected = {(name, seed, nfe) for name, s in students.items() for seed in s["seeds"] for nfe in cfg["nfe"]}
    assert expected <= runs, expected - runs
    by = {(r["method"], r["seed"], r["nfe"]): r for r in rows}
    real = next(r for r in rows if r["method"] == "train real")
    noise = next(r for r in rows if r["method"] == "noise")
    assert noise["domain_fd"] > real["domain_fd"] and noise["fid"] > real["fid"]
    kl_only = ("teacher (CNF)", "teacher (Euler)")  # the KL sanity and floor rows have only a KL
    for r in (r for r in rows if r["method"] not in kl_only):
        assert 0.0 <= r["class_mass_error"] <= 1.0, r
        assert r["class_coverage"] >= 0.0, r
        for key in ("precision", "recall", "domain_precision", "domain_recall", "domain_precision_teacher",
                    "domain_recall_teacher"):
            assert r.get(key) is None or 0.0 <= r[key] <= 1.0
        has_inception = r["seed"] < 0 or r["nfe"] in cfg["inception_nfe"]
        assert (r.get("fid") is not None) == has_inception, r
    kl = cfg["kl"]
    for name in kl["students"]:
        for seed in students[name]["seeds"]:
            for nfe in kl["nfe"]:
                r = by[(name, seed, nfe)]
                assert math.isfinite(r["kl"]) and r["kl_stderr"] > 0, r
    sanity = next(r for r in rows if r["method"] == "teacher (CNF)")
    assert math.isfinite(sanity["kl"]) and sanity["kl_stderr"] > 0
    assert math.isfinite(sanity["kl_refined"]) and sanity["kl_refined_stderr"] > 0  # the second accuracy
    assert {r["nfe"] for r in rows if r["method"] == "teacher (Euler)"} == set(kl["nfe"])
    assert table["counts"] == {"inception_samples": cfg["inception_samples"],
                               "domain_samples": cfg["domain_samples"],
                               "reference_images": params["images_reference"]["reference_samples"],
                               "kl_samples": kl["n_samples"],
                               "teacher_reference_samples": cfg["teacher_reference_samples"]}
    assert "KL estimator check" in (repo / "results/images/table/summary.md").read_text()
    common = set(students["perflow"]["seeds"]) & set(students["perflow_ma"]["seeds"])
    for d in table["perflow_ma_minus_perflow"]:
        assert d["seeds"] == len(common) and d["nfe"] in cfg["nfe"]


@pytest.mark.slow
def test_tiny_profile_image_tier_end_to_end(tiny_repo):
    """The image tier's stages: every output, the table's claims, a no-op rerun, `dvc status` clean
    (evaluation writes nothing into its inputs), and a forced re-evaluation that leaves the committed
    tree byte-identical."""
    repo, params = tiny_repo
    stages = _tier_stages("images")

    _run(["dvc", "repro", *stages], repo)  # (killed-and-resumed training: test_reliability.py)
    _check_outputs(repo, stages)
    _check_image_claims(repo, params)
    again = _run(["dvc", "repro", *stages], repo)
    assert "Running stage" not in again.stdout, again.stdout
    status = _run(["dvc", "status", *stages], repo)  # evaluation never writes into its inputs
    assert "up to date" in status.stdout, status.stdout

    _run([*GIT, "add", "-A"], repo)
    _run([*GIT, "commit", "-qm", "first run"], repo)
    forced = _run(["dvc", "repro", "-f", "-s", "table_images"], repo)
    assert forced.stdout.count("Running stage") == 1
    dirty = _run(["git", "status", "--porcelain"], repo).stdout
    assert dirty == "", f"re-running the table changed the committed tree:\n{dirty}"


def _check_analysis_claims(repo: Path, params: dict) -> None:
    """What the sweeps, the selection, the test table and the ablation state on any profile."""
    sweep = params["toy2d_sweep"]
    validation, test_seeds = sweep["validation_seeds"], sweep["test_seeds"]
    assert not set(validation) & set(test_seeds)
    for name, family in sweep["families"].items():
        m = _metrics(repo, f"results/toy2d/sweep/{name}/metrics.json")
        assert m["split"] == "validation" and m["seeds"] == validation and m["n_samples"] == sweep["n_samples"]
        twins = [True, False] if family["baseline"] else [True]
        cells = {(r["value"], r["ma"], r["nfe"]) for r in m["rows"]}
        assert cells == {(v, ma, n) for v in m["values"] for ma in twins for n in sweep["nfe"]}, name
        assert all(r["seeds"] == len(validation) for r in m["rows"])
    test = _metrics(repo, "results/toy2d/test/metrics.json")
    assert test["seeds"] == {"validation": validation, "test": test_seeds}
    for chosen in test["selected"]:
        rule = params["toy2d_test"]["select"][chosen["student"]]
        family = _metrics(repo, f"results/toy2d/sweep/{rule['family']}/metrics.json")
        assert chosen["seeds"] == validation and chosen["value"] in family["values"]
        eligible = [r for r in family["rows"] if r["ma"] and r["nfe"] == rule["nfe"] and r["status"] == "ok"
                    and r["value"] not in {str(v).rstrip("0").rstrip(".") for v in rule["exclude"]}]
        assert chosen["score"] == min(r[rule["metric"]] for r in eligible)  # the validation minimum
    students = params["toy2d_train"]["students"]
    assert {(r["student"], r["nfe"]) for r in test["rows"]} == {(s, n) for s in students
                                                                 for n in params["toy2d_eval"]["nfe"]}
    assert all(r["seeds"] == len(test_seeds) for r in test["rows"])
    m = sum(c["p_value"] is not None for c in test["comparisons"])
    for c in test["comparisons"]:
        if c["p_value"] is not None:
            assert c["p_value"] <= c["p_holm"] <= min(1.0, m * c["p_value"]) + 1e-12
    ablation = _metrics(repo, "results/toy2d/ablation/metrics.json")
    variants = params["toy2d_ablation"]["variants"]
    assert ablation["seeds"] == test_seeds[: params["toy2d_ablation"]["n_seeds"]]
    assert {(r["variant"], r["nfe"]) for r in ablation["rows"]} == {(v, n) for v in variants
                                                                     for n in params["toy2d_eval"]["nfe"]}
    cost = {r["variant"]: r["mflops_per_step"] for r in ablation["rows"]}
    for name, variant in variants.items():  # the MA term only adds work to a step
        if students[variant["student"]]["ma"]:
            assert cost[name] > cost["tm_only"], name
    related = _metrics(repo, "results/toy2d/related/metrics.json")
    rel = params["toy2d_related"]
    n_blocks = len(rel["ou_steps"]) + 1
    nfe = params["toy2d_eval"]["nfe"]
    assert related["seeds"] == test_seeds[: rel["n_seeds"]]
    assert {(r["method"], r["nfe"]) for r in related["rows"]} == {(m, n) for m in rel["methods"] for n in nfe}
    assert all(r["crosses_windows"] == (r["method"].startswith("lfm") and r["nfe"] < n_blocks)
               for r in related["rows"])
    assert {(r["method"], r["nfe"]) for r in related["reference_rows"]} == {
        (s, n) for s in rel["reference_students"] for n in nfe}  # this run's own test table
    tested = [c for c in related["comparisons"] if c["p_value"] is not None]
    assert {c["treated"] for c in related["comparisons"]} == set(rel["methods"])
    assert all(c["p_value"] <= c["p_holm"] <= min(1.0, len(tested) * c["p_value"]) + 1e-12 for c in tested)
    for method, cost in related["costs"].items():  # one network evaluation per NFE: cost linear in NFE
        assert cost["mflops_per_step"] > 0 and cost["saved_mib_per_step"] > 0
        per_nfe = [cost[f"sample_mflops_nfe{n}"] / n for n in nfe]
        assert max(per_nfe) - min(per_nfe) < 1e-9 * max(per_nfe), method
    if {"lfm", "lfm_distilled"} <= set(rel["methods"]):  # the distilled block's step runs the teacher's blocks too
        assert related["costs"]["lfm_distilled"]["mflops_per_step"] > related["costs"]["lfm"]["mflops_per_step"]


@pytest.mark.slow
def test_tiny_profile_analysis_stages_and_report(tiny_repo):
    """After the two tiers' runs: the sweeps, the sensitivity figure, the honest selection and test
    table, the ablation and the report; their claims, the report's provenance, a no-op rerun."""
    repo, params = tiny_repo
    stages = [*_tier_stages("toy2d", analysis=True), "report"]
    _run(["dvc", "repro", "report", "toy2d_related"], repo, timeout=1500)
    _check_outputs(repo, stages)
    _check_analysis_claims(repo, params)
    report = (repo / "results/report/REPORT.md").read_text()
    inputs = report.split("## Inputs")[1].split("\n## ")[0]
    assert "### Selected hyper-parameters (selection)" in report and "| read |" in inputs
    assert not [line for line in inputs.splitlines() if line.endswith("| not run |")], inputs
    headline = _metrics(repo, "results/report/headline.json")
    assert any(k.startswith("toy2d.test.kl.") for k in headline) and all(isinstance(v, int | float)
                                                                          for v in headline.values())
    again = _run(["dvc", "repro", "report", "toy2d_related"], repo)
    assert "Running stage" not in again.stdout, again.stdout
