"""The CIFAR-10 tier beside Liu et al.'s Table 1(a): comparable with the undistilled k-rectified flows
of the same protocol (NFE, solver, samples, reference set, FID network), never with the distilled
one-step rows (another protocol), and every differing field named."""

from replication.cifar10.references import comparison_table, our_protocol


def _rows():
    return [{"model": "teacher", "seed": None, "windows": 1, "nfe": 100, "fid": 3.1},
            {"model": "reflow", "seed": 0, "windows": 1, "nfe": 1, "fid": 14.2},
            {"model": "reflow", "seed": 0, "windows": 1, "nfe": 2, "fid": 8.0},
            {"model": "perflow4", "seed": 0, "windows": 4, "nfe": 4, "fid": 6.0}]


def _comparable(refs: list[dict], method: str, solver: str) -> str:
    (ref,) = [r for r in refs if r["method"] == method and r["fields"]["solver"] == solver]
    return ref["comparable"]


def test_undistilled_rows_are_comparable_and_distilled_ones_are_another_protocol():
    table, refs = comparison_table(_rows(), our_protocol(50000, 50000, "inception-v3-compat"))
    assert _comparable(refs, "2-Rectified Flow", "Euler") == "yes: reflow seed 0 (1 NFE)"
    assert _comparable(refs, "1-Rectified Flow", "Euler") == "yes: reflow seed 0 (1 NFE)"  # same protocol, other model
    distilled = _comparable(refs, "2-Rectified Flow (+Distill)", "Euler")
    assert distilled == "no: distillation (published one-step distillation of k-RF; ours none)"
    rk45 = _comparable(refs, "1-Rectified Flow", "RK45 (adaptive)")
    assert rk45 == "no: steps (published 127; ours 100); solver (published RK45 (adaptive); ours Euler)"
    assert _comparable(refs, "2-Rectified Flow", "RK45 (adaptive)").startswith("no: steps (published unknown")
    assert "| 2-Rectified Flow | Euler | 1 | none | 12.21 | yes: reflow seed 0 (1 NFE) |" in table
    assert "| teacher | - | 100 | 3.10 |" in table


def test_a_smaller_run_is_comparable_with_nothing_and_says_why():
    _, refs = comparison_table(_rows(), our_protocol(10000, 50000, "inception-v3-compat"))
    assert _comparable(refs, "2-Rectified Flow", "Euler") == "no: samples (published 50000; ours 10000)"
    _, refs = comparison_table(_rows(), our_protocol(50000, 20000, "tiny-test-fid"))
    cell = _comparable(refs, "2-Rectified Flow", "Euler")
    assert cell == ("no: reference (published CIFAR-10 train set, all 50000 images; ours CIFAR-10 train set, the first "
                    "20000 images); fid_features (published Inception 2015-12-05, pool3 (2048-d); ours tiny-test-fid "
                    "features)")
