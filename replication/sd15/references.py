"""COCO reference numbers (``replication/references/peers.yaml``) and the comparison table.

``comparison_table(metrics)`` puts our rows (model, steps, FID, CLIP) beside the published rows of the
same protocol; rows of another protocol are left out, never mixed in.
"""

from __future__ import annotations

from typing import Any

from ..references import load_peer_entries, paper_rows


def load_coco_references() -> list[dict[str, Any]]:
    """The COCO entries of ``peers.yaml`` (source and protocol checked on load) and the replicated
    paper's row, whose numbers are ``unknown``."""
    peers = [e for e in load_peer_entries() if e["protocol"].startswith("coco")]
    return peers + paper_rows("coco2017_5k_512", "PeRFlow + MA (paper)", ("fid", "clip"))


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else str(value if value is not None else "-")


def comparison_table(rows: list[dict[str, Any]], protocol: str = "coco2017_5k_512",
                     protocol_note: str = "") -> str:
    """A markdown table: our ``rows`` (``model``, ``steps``, ``fid``, ``clip``) then the references of
    ``protocol``. ``protocol_note`` says how our run differs (e.g. fewer prompts)."""
    lines = [f"Protocol: {protocol}. CLIP score = mean cosine similarity (x100 is the other common scale)."]
    if protocol_note:
        lines.append(f"Our run: {protocol_note}")
    lines += ["", "| source | model | steps | FID | CLIP |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| marflow (this run) | {row['model']} | {row['steps']} | {_fmt(row.get('fid'), 2)} | "
                     f"{_fmt(row.get('clip'), 4)} |")
    for ref in load_coco_references():
        if ref["protocol"] == protocol:
            lines.append(f"| {ref['source']} | {ref['method']} | {ref.get('steps', '-')} | "
                         f"{_fmt(ref.get('fid'), 2)} | {_fmt(ref.get('clip'), 3)} |")
    return "\n".join(lines) + "\n"
