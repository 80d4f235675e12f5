"""Reference numbers carry sources; the paper's unknown numbers are never invented."""

from replication.references import load_paper, load_peer_entries


def test_paper_numbers_are_unknown_and_claims_have_tests():
    paper = load_paper()
    assert all(entry["value"] == "unknown" for entry in paper["numbers"])
    assert all(claim["tested_by"] and claim["source"] for claim in paper["claims"])


def test_peer_entries_have_source_and_protocol():
    entries = load_peer_entries()
    perflow = [e for e in entries if e["method"] == "PeRFlow" and e["protocol"] == "coco2017_5k_512"]
    assert perflow and perflow[0]["fid"] == 22.97 and perflow[0]["clip"] == 0.294
    assert all(e["source"] and e["protocol_spec"]["dataset"] for e in entries)
