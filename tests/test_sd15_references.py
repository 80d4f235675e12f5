"""COCO reference numbers carry source and protocol; the comparison table marks a published row
comparable only when one of our rows agrees on every protocol field, and names the fields otherwise."""

import pytest

from replication.sd15 import references
from replication.sd15.config import ModelSpec, SD15EvalConfig
from replication.sd15.references import comparison_table, load_coco_references, our_protocol


def _cfg(**over) -> SD15EvalConfig:
    return SD15EvalConfig(coco_dir="c", output_dir="o", models={"m": ModelSpec(path="p")}, **over)


def _row(model="perflow", steps=4, guidance=1.5, fid=30.123, clip=0.28, **extra):
    return {"model": model, "steps": steps, "guidance": guidance, "fid": fid, "clip": clip, **extra}


def _cell(table: str, method: str, steps: int, source_part: str = "") -> str:
    """The last cell of the published row ``method`` at ``steps``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1] == method and cells[2] == str(steps) and source_part in cells[0]:
            return cells[-1]
    raise AssertionError(f"no row {method} {steps} in\n{table}")


def test_coco_references_have_source_protocol_and_the_design_numbers():
    refs = load_coco_references()
    assert all(r["source"] and r["protocol_spec"]["dataset"] for r in refs)
    got = {(r["method"], r["fields"]["steps"], r["protocol"]): (r.get("fid"), r.get("clip")) for r in refs}
    assert got[("PeRFlow", 4, "coco2017_5k_512")] == (22.97, 0.294)
    assert got[("2-Rectified Flow", 1, "coco2017_5k_512")] == (47.91, 0.272)
    assert got[("2-Rectified Flow", 2, "coco2017_5k_512")] == (31.35, 0.296)
    assert got[("2-Rectified Flow", 25, "coco2017_5k_512")] == (21.65, 0.315)
    assert got[("InstaFlow-0.9B", 1, "coco2017_5k_512")] == (23.72, 0.302)
    assert got[("SD 1.5 + DPM-Solver", 25, "coco2017_5k_512")] == (20.1, 0.318)
    assert got[("PeRFlow", 4, "coco2014_30k")][0] == 11.31
    paper = [r for r in refs if "paper" in r["method"]]
    assert paper and all(r["fid"] == "unknown" and r["clip"] == "unknown" for r in paper)


def test_our_default_protocol_is_the_published_one_but_for_guidance_and_steps():
    """At the defaults (5,000 prompts, 512 px, torch-fidelity's Inception, CLIP ViT-g-14) the
    evaluator states the published protocol's every field; guidance and steps are per row."""
    perflow = next(r for r in load_coco_references() if r["method"] == "PeRFlow" and r["protocol"] == "coco2017_5k_512")
    ours = our_protocol(_cfg())
    assert set(ours) == set(perflow["fields"]) - {"guidance", "steps"}
    assert all(ours[k] == perflow["fields"][k] for k in ours)
    small = our_protocol(_cfg(n_prompts=100, resolution=256))
    assert small["samples"] == 100 and small["reference"] == (
        "Lanczos resize of the short side to 256, centre crop 256 x 256")


def test_published_rows_of_unknown_guidance_are_never_comparable():
    table = comparison_table([_row(), _row(guidance=4.5)], our_protocol(_cfg()))
    assert "| marflow (this run) | perflow | 4 | 1.5 | 30.12 | 0.2800 | none |" in table
    assert _cell(table, "PeRFlow", 4, "Rectified Diffusion") == "no: guidance (published unknown; ours 1.5)"
    cell = _cell(table, "PeRFlow", 4, "README")
    for field in ("dataset (published COCO-2014 val; ours COCO-2017 val)", "samples (published 30000; ours 5000)",
                  "resolution (published unknown; ours 512)", "guidance (published unknown; ours 1.5)"):
        assert field in cell
    assert _cell(table, "InstaFlow-0.9B", 1).startswith("no: ") and "steps (published 1; ours 4)" in _cell(
        table, "InstaFlow-0.9B", 1)


def test_a_row_agreeing_on_every_field_is_comparable_and_one_differing_field_is_named(monkeypatch):
    """A published row with a stated guidance: our row at that guidance and step count is marked
    comparable (both ways); our run with fewer prompts is refused, naming the sample count."""
    protocol = our_protocol(_cfg())
    ref = {"method": "X", "source": "S", "fid": 20.0, "clip": 0.3, "protocol": "coco2017_5k_512",
           "protocol_spec": {"extra_fields": ["clip_model"]},
           "fields": {**protocol, "guidance": 1.5, "steps": 4}}
    monkeypatch.setattr(references, "load_coco_references", lambda: [ref])
    rows = [_row(guidance=4.5), _row(guidance=1.5), _row(steps=8, guidance=1.5)]
    table = comparison_table(rows, protocol)
    assert _cell(table, "X", 4) == "yes: perflow (4 steps, guidance 1.5)"
    assert "| marflow (this run) | perflow | 4 | 1.5 | 30.12 | 0.2800 | X 4 steps (S) |" in table
    assert "| marflow (this run) | perflow | 4 | 4.5 | 30.12 | 0.2800 | none |" in table
    fewer = comparison_table(rows, our_protocol(_cfg(n_prompts=1000)))
    assert _cell(fewer, "X", 4) == "no: samples (published 5000; ours 1000)"


@pytest.mark.parametrize("provided", [None, "weights/perflow-sd15-delta-weights"])
def test_the_published_perflow_row_says_not_provided_without_weights(provided):
    rows = [_row()] + ([_row(model="perflow_published", published=True)] if provided else [])
    table = comparison_table(rows, our_protocol(_cfg()), published_perflow=provided)
    published = [line for line in table.splitlines() if "published PeRFlow delta weights" in line]
    assert len(published) == 1
    if provided is None:
        assert "| not provided | not provided |" in published[0]
    else:
        assert "| perflow_published | 4 | 1.5 | 30.12 | 0.2800 |" in published[0]
