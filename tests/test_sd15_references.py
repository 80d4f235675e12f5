"""COCO reference numbers carry source and protocol; the comparison table keeps protocols apart."""

from replication.sd15.references import comparison_table, load_coco_references


def test_coco_references_have_source_protocol_and_the_design_numbers():
    refs = load_coco_references()
    assert all(r["source"] and r["protocol_spec"]["dataset"] for r in refs)
    got = {(r["method"], r.get("steps"), r["protocol"]): (r.get("fid"), r.get("clip")) for r in refs}
    assert got[("PeRFlow", 4, "coco2017_5k_512")] == (22.97, 0.294)
    assert got[("2-Rectified Flow", 1, "coco2017_5k_512")] == (47.91, 0.272)
    assert got[("2-Rectified Flow", 2, "coco2017_5k_512")] == (31.35, 0.296)
    assert got[("2-Rectified Flow", 25, "coco2017_5k_512")] == (21.65, 0.315)
    assert got[("InstaFlow-0.9B", 1, "coco2017_5k_512")] == (23.72, 0.302)
    assert got[("SD 1.5 + DPM-Solver", 25, "coco2017_5k_512")] == (20.1, 0.318)
    assert got[("PeRFlow", 4, "coco2014_30k")][0] == 11.31
    paper = [r for r in refs if "paper" in r["method"]]
    assert paper and all(r["fid"] == "unknown" and r["clip"] == "unknown" for r in paper)


def test_comparison_table_lists_ours_and_only_same_protocol_references():
    table = comparison_table([{"model": "ours", "steps": 4, "fid": 30.123, "clip": 0.28}])
    assert "| marflow (this run) | ours | 4 | 30.12 | 0.2800 |" in table
    assert "22.97" in table and "11.31" not in table  # COCO-2014 rows are another protocol
