"""CIFAR-10 tier: the pickle loader on a tiny stand-in in the standard format, configs, and a 2-step
smoke of every stage of the entry point on CPU (tiny UNet, tiny random FID extractor)."""

import json
import pickle

import numpy as np
import pytest
import torch
import yaml

from replication.cifar10.config import load_config
from replication.cifar10.data import (
    CifarFileMissing,
    load_cifar10,
    load_cifar10_uint8,
    load_label_names,
    to_uint8,
    write_batch,
)
from replication.cifar10.references import load_cifar10_references
from replication.config import ConfigError

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar(root, per_batch=3, seed=0):
    """Five training batches and a test batch of random images, plus batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        write_batch(folder / name, images, labels)
        written[name] = (images, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072}, fh)
    return written


def test_loader_shapes_range_labels_and_layout(tmp_path):
    written = make_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (15,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    first = written["data_batch_1"][0][0]
    # the standard row layout: the first 1024 bytes are the red plane, row-major
    raw = first.reshape(-1)
    assert x[0, 0, 0, 1].item() == pytest.approx(raw[1] / 127.5 - 1, abs=1e-6)
    assert x[0, 1, 2, 3].item() == pytest.approx(raw[1024 + 2 * 32 + 3] / 127.5 - 1, abs=1e-6)
    expected_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y.tolist() == expected_labels
    u8, _ = load_cifar10_uint8(tmp_path, "train")
    assert torch.equal(to_uint8(x), u8) and u8[-1].numpy().tolist() == written["data_batch_5"][0][-1].tolist()
    xt, yt = load_cifar10(tmp_path, "test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == written["test_batch"][1]
    assert load_label_names(tmp_path) == NAMES
    assert torch.equal(load_cifar10(tmp_path)[0], x)  # deterministic


def test_loader_names_the_missing_file_and_where_it_goes(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CifarFileMissing) as err:
        load_cifar10(tmp_path, "train")
    message = str(err.value)
    assert "data_batch_3" in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "\n" not in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(CifarFileMissing, match="test_batch"):
        load_cifar10(tmp_path / "nowhere", "test")


def test_references_have_sources_and_match_the_design_numbers():
    refs = load_cifar10_references()
    fids = {e["method"]: e["fid"] for e in refs["entries"]}
    assert fids["1-Rectified Flow"] == 2.58 and fids["2-Rectified Flow (distilled)"] == 4.85
    assert all(e["source"] and e["protocol_spec"]["samples"] == 50000 for e in refs["entries"])
    assert fids["reflow / PeRFlow + MA (paper)"] == "unknown"


def tiny_params(tmp_path, extractor):
    return {
        "seed": 0, "device": "cpu",
        "checkpoint_dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "results"),
        "data": {"root": str(tmp_path / "data"), "n_train": 10, "hflip": True},
        "model": {"block_out_channels": [8, 16], "attention": [False, True], "layers_per_block": 1,
                  "norm_num_groups": 4, "dropout": 0.0},
        "teacher": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 0, "checkpoint_every": 1},
        "pairs": {"n_pairs": 4, "shard_size": 2, "steps": 1, "solver": "euler", "batch_size": 4},
        "student_optim": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 0},
        "students": {
            "reflow": {"method": "reflow", "windows": 1},
            "perflow2_ma": {"method": "perflow", "windows": 2, "teacher_steps": 1, "ma_weight": 0.1},
        },
        "ma": {"weight": 0.1, "substeps": 1, "divergence": "hutchinson_fd", "n_probes": 1},
        "fid": {"n_samples": 6, "n_reference": 8, "nfe": [1, 2], "teacher_nfe": [2], "batch_size": 4,
                "feature_extractor": extractor, "grid_images": 4, "save_cpu_ram": True},
    }


def register_tiny_extractor(name):
    """A fixed random projection of 4x4-pooled pixels standing in for Inception (weights offline)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class Tiny(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.register_buffer("proj", torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))

        @staticmethod
        def get_provided_features_list():
            return ("16",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "16"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
            return (torch.tanh(pooled @ self.proj).double(),)

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, Tiny)


def test_entry_point_smoke_every_stage_on_cpu(tmp_path):
    from replication.cifar10.run import main

    torch.set_num_threads(1)
    make_cifar(tmp_path / "data", per_batch=2)
    register_tiny_extractor("cifar10-test-tiny")
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path, "cifar10-test-tiny")))
    args = ["--params", str(params), "--no-progress", "--stage"]
    assert main(args + ["teacher"])["steps"] == 2
    assert main(args + ["pairs"]) == {"shards": 2, "n_pairs": 4}
    students = main(args + ["students"])
    assert set(students) == {"reflow", "perflow2_ma"}
    assert "ma" in students["perflow2_ma"]["last"] and "ma" not in students["reflow"]["last"]
    result = main(args + ["fid"])
    rows = {(r["model"], r["nfe"]): r for r in result["rows"]}
    assert set(rows) == {("teacher", 2), ("reflow", 1), ("reflow", 2), ("perflow2_ma", 1), ("perflow2_ma", 2)}
    assert rows[("perflow2_ma", 1)]["crosses_windows"] and not rows[("perflow2_ma", 2)]["crosses_windows"]
    assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 for r in rows.values())
    saved = json.loads((tmp_path / "results" / "fid.json").read_text())
    assert saved["rows"] == result["rows"] and (tmp_path / "results" / "samples_reflow_nfe2.png").is_file()
    with pytest.raises(KeyError, match="nope"):
        main(args + ["students", "--student", "nope"])


def test_config_errors_name_the_key(tmp_path):
    base = tiny_params(tmp_path, "x")
    bad = {**base, "students": {"s": {"method": "reflow", "windows": 4}}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"cifar10.students.s.windows = 4: reflow has one window"):
        load_config(tmp_path / "a.yaml")
    bad = {**base, "ma": {"weight": 0.1, "divergence": "exact", "n_probes": 2}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"cifar10.ma.n_probes"):
        load_config(tmp_path / "b.yaml")
    assert load_config("replication/cifar10/gpu.yaml").fid.n_samples == 50000
