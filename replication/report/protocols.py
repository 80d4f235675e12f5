"""Our tiers' rows in the words of ``peers.yaml``, and each published row's comparability with them.

``toy2d_rows`` / ``images_rows`` state the protocol fields of every row of a tier (label, fields),
``comparison_rows`` sets every published row (and the replicated paper's, all ``unknown``) beside
them with ``replication.references.comparable_cell``: ``yes: <our rows>`` only where every protocol
field agrees (dataset, sample count, resolution, reference set, feature network, guidance, steps,
and the protocol's own extra fields), else ``no:`` and the fields that differ from our closest row.
"""

from __future__ import annotations

from typing import Any

from ..references import comparable_cell, load_peer_entries, paper_rows
from .config import ReportConfig
from .inputs import Inputs

UNCONDITIONAL = "none (unconditional)"
#: the FID network of the image tier (the TF-2015 Inception graph), spelled as peers.yaml spells it
INCEPTION_TF2015 = "Inception 2015-12-05, pool3 (2048-d)"
PAPER_METHOD = "reflow / PeRFlow + MA (paper)"

Row = tuple[str, dict[str, Any]]


def _common(**fields: Any) -> dict[str, Any]:
    return {"caption": UNCONDITIONAL, "guidance": UNCONDITIONAL, "clip_model": "none", "solver": "Euler",
            "distillation": "none", **fields}


def toy2d_rows(inputs: Inputs) -> list[Row]:
    """One row per (student, NFE) of the fig1 table: a planar Gaussian mixture scored exactly."""
    data = inputs.get("fig1")
    if data is None:
        return []
    fields = _common(dataset="Gaussian mixture in the plane (exact teacher)", samples=data.get("n_samples"),
                     resolution="none (points in the plane)", reference="the exact teacher's density",
                     fid_features="none (exact KL and TV, no features)")
    return [(f"{r['student']} ({r['nfe']} NFE)", {**fields, "steps": r["nfe"]}) for r in data["table"]]


def images_rows(inputs: Inputs, images: dict[str, Any], cfg: ReportConfig) -> list[Row]:
    """One row per (student, NFE) of the image summary that has an Inception FID: the tier's dataset
    at its resolution (the ``images`` params section), its FID sample count and reference set."""
    data = inputs.get("images_table")
    if data is None:
        return []
    counts = data.get("counts", {})
    size = images.get("size")
    fields = _common(dataset=f"{images.get('dataset')} {size}x{size} (held-out split)",
                     samples=counts.get("inception_samples"), resolution=size,
                     reference=f"{images.get('dataset')} held-out split, {counts.get('reference_images')} images",
                     fid_features=INCEPTION_TF2015)
    students = {name for pair in cfg.treated_control() for name in pair}
    return [(f"{r['method']} ({r['nfe']} NFE)", {**fields, "steps": r["nfe"]}) for r in data.get("summary", [])
            if r.get("method") in students and r.get("fid") is not None]


def references() -> list[dict[str, Any]]:
    """Every published entry and, per protocol, the replicated paper's row (``unknown``)."""
    entries = load_peer_entries()
    protocols: dict[str, tuple[str, ...]] = {}
    for e in entries:
        protocols.setdefault(e["protocol"], tuple(e["protocol_spec"]["metrics"]))
    return entries + [row for name, metrics in protocols.items() for row in paper_rows(name, PAPER_METHOD, metrics)]


def comparison_rows(ours: list[Row]) -> list[dict[str, Any]]:
    """``{source, method, protocol, steps, numbers, comparable}`` for every reference row."""
    out = []
    for ref in references():
        metrics = ref["protocol_spec"]["metrics"]
        out.append({"source": ref["source"], "method": ref["method"], "protocol": ref["protocol"],
                    "steps": ref["fields"]["steps"], "numbers": {m: ref.get(m) for m in metrics},
                    "comparable": comparable_cell(ref, ours)})
    return out
