"""Reference numbers carry sources and every protocol field; the paper's unknown numbers are never
invented; a published row is comparable only when every protocol field agrees, ``unknown`` never."""

import copy
from importlib import resources

import pytest
import yaml

from replication.references import (
    PROTOCOL_FIELDS,
    check_paper,
    check_peers,
    compare,
    comparability,
    comparable_cell,
    load_paper,
    load_peer_entries,
    same_value,
)


def _raw(name: str) -> dict:
    return yaml.safe_load(resources.files("replication.references").joinpath(name).read_text())


def test_paper_numbers_are_unknown_and_claims_have_tests():
    paper = load_paper()
    assert all(entry["value"] == "unknown" for entry in paper["numbers"])
    assert all(set(entry["protocol"].values()) == {"unknown"} and set(PROTOCOL_FIELDS) <= set(entry["protocol"])
               for entry in paper["numbers"])
    assert all(claim["tested_by"] and claim["source"] for claim in paper["claims"])


def test_every_peer_entry_has_a_source_and_every_protocol_field():
    """Read from the YAML itself: each entry's fields, its own over its protocol's, cover the eight
    common fields and its protocol's extra ones, none empty; each entry and protocol names a source."""
    raw = _raw("peers.yaml")
    assert raw["entries"]
    for entry in raw["entries"]:
        spec = raw["protocols"][entry["protocol"]]
        assert entry["source"] and spec["source"]
        needed = {"dataset", "samples", "resolution", "caption", "guidance", "steps", "reference", "fid_features",
                  *spec.get("extra_fields", [])}
        for field in needed:
            value = entry.get(field, spec.get(field))
            assert value not in (None, ""), (entry["method"], field)
    loaded = load_peer_entries()
    assert len(loaded) == len(raw["entries"]) and all(set(PROTOCOL_FIELDS) <= set(e["fields"]) for e in loaded)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d["protocols"]["coco2017_5k_512"].pop("guidance"), "['guidance']"),
    (lambda d: d["protocols"]["cifar10_50k"].pop("reference"), "(1-Rectified Flow): no ['reference']"),
    (lambda d: d["entries"][0].pop("source"), "entries[0] (PeRFlow): no source"),
    (lambda d: d["protocols"]["coco2014_30k"].pop("source"), "protocols.coco2014_30k: no source"),
    (lambda d: d["entries"][0].update(fid="n/a"), "fid = 'n/a'"),
    (lambda d: d["entries"][0].update(sampler="euler"), "['sampler'] are not fields"),
    (lambda d: d["entries"][0].update(protocol="coco_1k"), "unknown protocol 'coco_1k'"),
])
def test_the_schema_check_refuses_an_incomplete_entry(edit, needle):
    data = copy.deepcopy(_raw("peers.yaml"))
    check_peers(copy.deepcopy(data))  # the stored file passes
    edit(data)
    with pytest.raises(ValueError) as err:
        check_peers(data)
    assert needle in str(err.value)


def test_the_paper_schema_check_refuses_a_missing_protocol_field():
    paper = copy.deepcopy(_raw("paper.yaml"))
    paper["numbers"][0]["protocol"] = {k: v for k, v in paper["numbers"][0]["protocol"].items() if k != "caption"}
    with pytest.raises(ValueError, match=r"numbers\[0\] \(FID\): protocol lacks \['caption'\]"):
        check_paper(paper)


def test_unknown_never_matches_and_values_compare_by_meaning():
    assert not same_value("unknown", "unknown") and not same_value("unknown", 1.5) and not same_value(None, None)
    assert same_value(5000, 5000.0) and not same_value(5000, 4999) and not same_value(1.5, 4.5)
    assert same_value("COCO-2017  val", "coco-2017 val") and not same_value("COCO-2017 val", "COCO-2014 val")
    assert not same_value(True, 1.0)  # a flag is not a number


def test_comparability_names_exactly_the_differing_fields():
    ref = {"fields": {"samples": 5000, "guidance": "unknown", "steps": 4, "caption": "first"},
           "protocol_spec": {}}
    fields = ("samples", "guidance", "steps", "caption")
    ours = {"samples": 5000, "guidance": 1.5, "steps": 4, "caption": "first"}
    assert [d.field for d in compare(ref["fields"], ours, fields)] == ["guidance"]
    ref2 = {"fields": {"samples": 5000, "guidance": 1.5, "steps": 4, "caption": "first", "dataset": "x",
                       "resolution": 512, "reference": "r", "fid_features": "f"}, "protocol_spec": {}}
    full = {**ref2["fields"]}
    rows = [("a (4 steps)", {**full, "guidance": 4.5}), ("b (4 steps)", full), ("c (8 steps)", {**full, "steps": 8})]
    assert comparability(ref2, rows) == (["b (4 steps)"], [])
    assert comparable_cell(ref2, rows) == "yes: b (4 steps)"
    # no match: the differences of the closest row (one field), spelled out
    far = [("a", {**full, "guidance": 4.5, "samples": 100}), ("c", {**full, "steps": 8})]
    assert comparable_cell(ref2, far) == "no: steps (published 4; ours 8)"


def test_the_published_sd_and_cifar_numbers():
    got = {(e["method"], e["fields"]["steps"], e["protocol"]): e["fid"] for e in load_peer_entries()}
    assert got[("PeRFlow", 4, "coco2017_5k_512")] == 22.97
    assert got[("1-Rectified Flow", 127, "cifar10_50k")] == 2.58
    assert got[("2-Rectified Flow", 1, "cifar10_50k")] == 12.21
    assert got[("2-Rectified Flow (+Distill)", 1, "cifar10_50k")] == 4.85
