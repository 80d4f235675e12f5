"""Bad inputs a user gives, and the one line each one gets (issue "nothing lost, nothing silently
wrong"): params that are incomplete, duplicated or mistyped, cross-field mistakes, checkpoints of
other params, NaN weights and outputs, image folders of unusual formats, results folder modes.

Each message test checks the exact line the stage runner prints (``error: ...``), so a reworded
message is a conscious change.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from replication import registry, stage
from replication.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS_TEXT = (ROOT / "params.yaml").read_text()


def _run_check(tmp_path: Path, text: str, name: str, capsys) -> tuple[int, str, str]:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    code = stage.main([name, "--params", str(path), "--check-only"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(tmp_path, text, name, capsys) -> str:
    code, _, err = _run_check(tmp_path, text, name, capsys)
    assert code == 2, err
    assert err.count("\n") == 1, err  # one line
    return err.rstrip("\n")


def _replace(old: str, new: str, text: str = PARAMS_TEXT) -> str:
    assert text.count(old) >= 1, old
    return text.replace(old, new, 1)


# --- params complete and strict ---------------------------------------------------------------------

def test_a_missing_key_is_refused_naming_it(tmp_path, capsys):
    text = _replace("  steps: 2000\n  lr: 0.002\n", "  lr: 0.002\n")
    assert _error_line(tmp_path, text, "toy2d_train", capsys) == (
        "error: toy2d_train.steps: required key is missing; every parameter a stage reads is written out "
        "in the params file (the library's defaults would be steps: 2000)")


def test_a_missing_section_is_refused_naming_it(tmp_path, capsys):
    params = yaml.safe_load(PARAMS_TEXT)
    del params["toy2d_eval"]
    assert _error_line(tmp_path, yaml.safe_dump(params), "fig1_mog", capsys) == (
        "error: toy2d_eval: params section is missing; every stage that reads it needs it written out in "
        "the params file")


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path, capsys):
    text = _replace("  steps: 2000\n", "  steps: 40\n  steps: 2000\n")
    first = text.splitlines().index("  steps: 40") + 1
    line = _error_line(tmp_path, text, "toy2d_train", capsys)
    assert line == (f"error: {tmp_path / 'params.yaml'}, line {first + 1}, column 3: duplicate key 'steps' "
                    f"(first at line {first}); DVC refuses such a file too: keep one of them")


def test_a_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    text = _replace("  lr: 0.002\n", "  lr: [0.002\n")
    line = _error_line(tmp_path, text, "toy2d_train", capsys)
    assert line.startswith(f"error: {tmp_path / 'params.yaml'}, line ") and ", column " in line
    assert "not valid YAML" in line


def test_an_exponent_without_a_dot_is_the_number_dvc_reads(tmp_path, capsys):
    """YAML 1.1 reads ``2e-3`` as a string; DVC (YAML 1.2) and marflow read the number."""
    path = tmp_path / "params.yaml"
    path.write_text(_replace("  lr: 0.002\n", "  lr: 2e-3\n"))
    assert load_params(path)["toy2d_train"]["lr"] == 0.002
    assert registry.section(load_params(path), "toy2d_train").lr == 0.002
    assert load_params(path)["toy2d"]["seed"] == 0 and isinstance(load_params(path)["toy2d"]["seed"], int)


@pytest.mark.parametrize(("old", "new", "stage_name", "expected"), [
    ("  nfe: [1, 2, 4, 8]\n  seed: 1234\n  sw_projections", "  nfe: []\n  seed: 1234\n  sw_projections",
     "fig1_mog", "error: toy2d_eval.nfe = []: list at least one NFE (an empty list evaluates nothing)"),
    ("  nfe: [1, 2, 4, 8]\n  seed: 1234\n  sw_projections", "  nfe: [1, 1, 4]\n  seed: 1234\n  sw_projections",
     "fig1_mog", "error: toy2d_eval.nfe = [1, 1, 4]: [1] listed more than once: list each NFE once"),
    ("  students: [perflow, perflow_ma]\n\nunderdetermination:", "  students: []\n\nunderdetermination:",
     "fig1_mog", "error: fig1_mog.students = []: list at least one student (an empty list evaluates nothing)"),
    ("    weights: [0.30, 0.20, 0.15, 0.15, 0.10, 0.10]", "    weights: [0.30, 0.20, 0.15, 0.15, 0.20]",
     "toy2d_train", "error: toy2d.mixture.weights = [0.3, 0.2, 0.15, 0.15, 0.2]: 5 weights, 6 means and 6 "
     "stds: one weight, one mean and one std per mode"),
    ("  dataset: digits ", "  dataset: folder ", "images_teacher",
     "error: images.folder: required key is missing; every parameter a stage reads is written out in the "
     "params file (the library's defaults would be folder: None)"),
])
def test_cross_field_mistakes_are_refused_up_front(tmp_path, capsys, old, new, stage_name, expected):
    assert _error_line(tmp_path, _replace(old, new), stage_name, capsys) == expected


def test_a_folder_dataset_needs_a_folder_path(tmp_path, capsys):
    text = _replace("  dataset: digits ", "  dataset: folder\n  folder: null\n ")
    assert _error_line(tmp_path, text, "images_teacher", capsys) == (
        "error: images.folder = None: dataset: folder needs the path of a folder of PNG/JPEG images")
    text = _replace("  dataset: digits ", f"  dataset: folder\n  folder: {tmp_path / 'nowhere'}\n ")
    assert _error_line(tmp_path, text, "images_teacher", capsys) == (
        f"error: images.folder = '{tmp_path / 'nowhere'}': no such directory")


# --- fingerprints checked by every stage that loads a run --------------------------------------------

def test_an_evaluation_refuses_checkpoints_made_with_other_params(tmp_path):
    from replication.common.runs import StaleRunError, prepare_run_dir
    from replication.toy2d.tier import load_student, run_fingerprint

    params = load_params(ROOT / "params.yaml")
    toy, train = registry.section(params, "toy2d"), registry.section(params, "toy2d_train")
    student = train.students["perflow"]
    prepare_run_dir(tmp_path / "perflow", run_fingerprint(student, train, toy))
    (tmp_path / "perflow" / "last.pt").write_bytes(b"")  # never opened: the fingerprint is checked first
    other = copy.deepcopy(params)
    other["toy2d_train"]["lr"] = 0.001
    with pytest.raises(StaleRunError, match=r"perflow: made with train.lr = 0.002, but the params and code "
                                            r"now give 0.001; rerun the toy2d_train stage"):
        load_student("perflow", registry.section(other, "toy2d_train"), toy, tmp_path)
    (tmp_path / "perflow" / "fingerprint.json").unlink()
    with pytest.raises(StaleRunError, match=r"no fingerprint.json"):
        load_student("perflow", train, toy, tmp_path)


# --- NaN weights and outputs are not a folded map; NaN metrics fail the stage -------------------------

def test_nan_outputs_of_the_euler_map_are_refused_not_counted_as_folds():
    from marflow_core import NonFiniteOutputError
    from marflow_core.logdensity import euler_map_with_logdet

    def field(x, t):
        return torch.where(x[:, :1] > 0, torch.full_like(x, math.nan), -x)

    x0 = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-2.0, 1.0]])
    with pytest.raises(NonFiniteOutputError, match=r"Euler map, step 1 of 2: 1 of 3 samples are NaN"):
        euler_map_with_logdet(field, x0, torch.linspace(0, 1, 3))
    folded = euler_map_with_logdet(lambda x, t: -2.0 * x, x0, torch.linspace(0, 1, 3))
    assert folded.n_folded == 3  # det(I - 1 I) = 0 each step: a true fold, finite outputs


def test_a_headline_metric_that_is_nan_fails_unless_the_row_says_why():
    from replication.common.headline import MetricError, check_finite

    rows = [{"student": "a", "nfe": 1, "kl": 0.5, "status": "ok"},
            {"student": "b", "nfe": 2, "kl": float("nan"), "status": "ok"}]
    with pytest.raises(MetricError, match=r"fig: kl = nan for student b, nfe 2: a headline metric must be"):
        check_finite(rows, ("kl",), "fig")
    with pytest.raises(MetricError, match=r"kl = None"):
        check_finite([{"student": "c", "nfe": 1, "kl": None}], ("kl",), "fig")
    rows[1]["status"] = "folded map: log q undefined where det(I + hJ) = 0"
    check_finite(rows, ("kl",), "fig")  # an expected failure, said in words


def test_a_student_with_nan_weights_fails_the_fig1_table():
    from marflow_core import NonFiniteOutputError, TimeWindows
    from replication.toy2d.evaluate import evaluate_student
    from replication.toy2d.tier import TrainedStudent, make_model, make_teacher

    params = load_params(ROOT / "params.yaml")
    params["toy2d_eval"].update(n_samples=64, mmd_samples=32, tm_eval_batch=64, teacher_steps=2,
                                sw_projections=4, nfe=[1])
    toy, train = registry.section(params, "toy2d"), registry.section(params, "toy2d_train")
    model = make_model(train, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    student = TrainedStudent("perflow", train.students["perflow"], model, TimeWindows(4), [])
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite"):
        evaluate_student(student, make_teacher(toy), registry.section(params, "toy2d_eval"))


# --- images as a user's folder really is ---------------------------------------------------------------

def _save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)
    return path


def test_a_16_bit_gradient_png_reads_to_its_true_values(tmp_path):
    from replication.images.data import read_image

    ramp = np.linspace(0, 65535, 16).round().astype(np.uint16)[None, :].repeat(16, 0)
    path = _save(ramp, tmp_path / "ramp16.png")
    x = read_image(path, 16, 1)
    expected = torch.from_numpy(ramp[0].astype(np.float64) / 65535 * 2 - 1).float()
    assert torch.allclose(x[0, 0], expected, atol=1e-6)
    assert float(x.max()) == pytest.approx(1.0) and float(x[0, 0, 8]) < 0.1  # not clipped at 255


def test_palette_grey_alpha_and_opaque_rgba_are_converted_and_transparency_refused(tmp_path):
    from PIL import Image

    from replication.images.data import UnreadableImage, read_image

    grey = np.full((8, 8), 51, np.uint8)
    la = np.stack([grey, np.full_like(grey, 255)], -1)
    assert torch.allclose(read_image(_save(la, tmp_path / "la.png", "LA"), 8, 1), torch.tensor(51 / 127.5 - 1))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    red = read_image(_save(rgba, tmp_path / "rgba.png", "RGBA"), 8, 3)
    assert torch.allclose(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    palette = Image.fromarray(np.full((8, 8, 3), [0, 255, 0], np.uint8)).convert("P")
    palette.save(tmp_path / "p.png")
    assert torch.allclose(read_image(tmp_path / "p.png", 8, 3)[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    rgba[0, 0, 3] = 0
    with pytest.raises(UnreadableImage, match=r"rgba_t.png: it has transparent pixels \(mode RGBA, 1 pixels"):
        read_image(_save(rgba, tmp_path / "rgba_t.png", "RGBA"), 8, 3)


def test_class_subfolders_label_a_folder_and_a_flat_one_is_unlabelled(tmp_path):
    from replication.images.data import load_image_folder_split

    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "labelled" / cls).mkdir(parents=True)
        for i in range(5):
            _save(np.full((8, 8), value, np.uint8), tmp_path / "labelled" / cls / f"{i}.png")
    split = load_image_folder_split(tmp_path / "labelled", 8, 1, 0.4, 0)
    labels = torch.cat([split.train_labels, split.heldout_labels])
    images = torch.cat([split.train, split.heldout])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    assert torch.all((images[:, 0, 0, 0] > 0) == (labels == 1))  # dog (label 1) is the bright class
    (tmp_path / "flat").mkdir()
    for i in range(4):
        _save(np.full((8, 8), 10 * i, np.uint8), tmp_path / "flat" / f"{i}.png")
    assert load_image_folder_split(tmp_path / "flat", 8, 1, 0.5, 0).train_labels is None


def test_an_unlabelled_folder_skips_the_label_stages_at_validation(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    for i in range(4):
        _save(np.full((8, 8), 10 * i, np.uint8), tmp_path / "flat" / f"{i}.png")
    text = _replace("  dataset: digits ", f"  dataset: folder\n  folder: {tmp_path / 'flat'}\n ")
    code, out, _ = _run_check(tmp_path, text, "images_teacher", capsys)
    assert code == 0 and "skipped" not in out
    code, out, _ = _run_check(tmp_path, text, "images_reference", capsys)
    assert code == 0
    assert out.splitlines()[-1] == (
        f"stage images_reference will be skipped: images.folder = '{tmp_path / 'flat'}' has no class labels "
        f"(its images are not laid out as <folder>/<class>/<image> with >= 2 classes); the domain "
        f"classifier, its FD and the class-mass metrics need labels")


def test_a_skipped_stage_writes_every_declared_output_saying_why(tmp_path):
    import nbformat

    from replication.skipped import declared_outputs, write_skipped

    outs = declared_outputs("table_images", ROOT)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    results = tmp_path / "tmp-results"
    results.mkdir()
    write_skipped("table_images", "no labels", "results/images/table", results, tmp_path)
    for rel in outs:
        inside = rel.startswith("results/images/table/")
        path = results / Path(rel).relative_to("results/images/table") if inside else tmp_path / rel
        assert path.exists(), rel
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics == {"skipped": "no labels"}
    nb = nbformat.read(results / "table_images.ipynb", as_version=4)
    assert "no labels" in nb.cells[0].source
    assert (results / "sample_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- messages that sent the user the wrong way ---------------------------------------------------------

def test_a_deleted_feature_cache_says_which_stage_rebuilds_it(tmp_path):
    from replication.images.features import CachedFeatures, _CacheOnly

    cached = CachedFeatures("ref", str(tmp_path), "inception", "2048", 3)
    with pytest.raises(FileNotFoundError, match=r"are gone \(deleted after they were written\); rebuild them "
                                                r"with `dvc repro -f images_reference`"):
        _CacheOnly(cached)[0]


def test_written_files_and_results_folders_have_the_usual_permissions(tmp_path, monkeypatch):
    from marflow_core.atomic import atomic_write_text
    from replication.registry import StageSpec

    old = os.umask(0o022)
    try:
        atomic_write_text("x", tmp_path / "a.txt")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644

        spec = StageSpec("fake", "notebooks/fake.py", (), "results/fake")

        def fake_execute(spec, params, tmp_dir, root, progress):
            (tmp_dir / "fake.ipynb").write_text("{}")
            return tmp_dir / "fake.ipynb"

        monkeypatch.setattr(stage, "validated", lambda name, p, root=None: (spec, {}, Path("params.yaml")))
        monkeypatch.setattr(stage, "_execute", fake_execute)
        monkeypatch.setattr(stage, "_scrub", lambda *a: None)
        out = stage.run_stage("fake", root=tmp_path, progress=False)
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_no_committed_section_relies_on_a_code_default():
    """Every section of both params files is complete: validation with ``complete=True`` (what every
    stage runs) accepts them, so no value the user cannot see is used."""
    from replication.config import from_dict

    for params_file in ("params.yaml", "replication/gpu/params.yaml"):
        params = load_params(ROOT / params_file)
        for name, cls in registry.sections(params_file).items():
            data = params[name]
            if name == "cifar10":
                data = {**data, "device": "cpu"}  # this machine has no GPU
            from_dict(cls, data, name, complete=True)
    with pytest.raises(ConfigError, match="required key is missing"):
        from_dict(registry.sections()["toy2d_eval"], {"n_samples": 10}, "toy2d_eval")
