"""COCO reference numbers (``replication/references/peers.yaml``) and the comparison table.

``our_protocol(cfg)`` states the protocol fields of an ``sd15_eval`` run in the words of
``peers.yaml``; ``comparison_table(rows, protocol)`` sets our rows (model, steps, guidance, FID,
CLIP) beside every published SD 1.5 row, and marks a published row comparable only when one of our
rows agrees with it on every protocol field (``replication.references.compare``; ``unknown`` never
agrees), naming the fields that differ otherwise.
"""

from __future__ import annotations

from typing import Any

from ..references import comparability, comparable_cell, load_peer_entries, paper_rows

#: the published protocol our evaluator implements (``coco.py``), in the words of ``peers.yaml``
PROTOCOL = "coco2017_5k_512"
DATASET = "COCO-2017 val"
CAPTION_RULE = "first caption of each image in captions_val2017.json order"
REFERENCE_RULE = "Lanczos resize of the short side to {size}, centre crop {size} x {size}"
#: FID feature networks by torch-fidelity extractor name
FID_FEATURES = {"inception-v3-compat": "Inception 2015-12-05, pool3 (2048-d)"}
#: open_clip (model, pretrained tag) -> the hub model the published protocol names
CLIP_MODELS = {("ViT-g-14", "laion2b_s12b_b42k"): "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"}
#: the published PeRFlow delta weights' row, when ``published_perflow.delta_weights`` is null
NOT_PROVIDED = "not provided"


def load_coco_references() -> list[dict[str, Any]]:
    """The COCO entries of ``peers.yaml`` (schema checked on load) and the replicated paper's row,
    whose numbers and protocol fields are ``unknown``."""
    peers = [e for e in load_peer_entries() if e["protocol"].startswith("coco")]
    return peers + paper_rows(PROTOCOL, "PeRFlow + MA (paper)", ("fid", "clip"))


def our_protocol(cfg) -> dict[str, Any]:
    """The protocol fields of an ``SD15EvalConfig`` run (without ``steps`` / ``guidance``, per row)."""
    clip = CLIP_MODELS.get((cfg.clip_model, cfg.clip_pretrained), f"open_clip {cfg.clip_model}/{cfg.clip_pretrained}")
    return {"dataset": DATASET, "samples": cfg.n_prompts, "resolution": cfg.resolution, "caption": CAPTION_RULE,
            "reference": REFERENCE_RULE.format(size=cfg.resolution),
            "fid_features": FID_FEATURES.get(cfg.fid_extractor, f"{cfg.fid_extractor} features"),
            "clip_model": f"{clip}, cosine similarity"}


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else str(value if value is not None else "-")


def _label(row: dict[str, Any]) -> str:
    return f"{row['model']} ({row['steps']} steps, guidance {row['guidance']:g})"


def comparison_table(rows: list[dict[str, Any]], protocol: dict[str, Any], protocol_note: str = "",
                     published_perflow: str | None = None) -> str:
    """A markdown report: our protocol, our ``rows`` (``model``, ``steps``, ``guidance``, ``fid``,
    ``clip``) each with the published rows it is comparable with, then every published SD 1.5 row
    with ``yes: <our rows>`` or ``no: <the fields that differ>``. ``published_perflow``: where the
    published PeRFlow delta weights came from, None for a ``not provided`` row."""
    refs = load_coco_references()
    ours = [(_label(r), {**protocol, "steps": r["steps"], "guidance": r["guidance"]}) for r in rows]
    lines = ["Our protocol: " + "; ".join(f"{k} = {v}" for k, v in protocol.items()) + ".",
             "CLIP score = mean cosine similarity (x100 is the other common scale). A published row is "
             "comparable only when one of our rows agrees with it on every protocol field "
             "(replication/references/peers.yaml); `unknown` agrees with nothing."]
    if protocol_note:
        lines.append(f"Our run: {protocol_note}")
    lines += ["", "| source | model | steps | guidance | FID | CLIP | comparable published rows |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, (_, fields) in zip(rows, ours, strict=True):
        same = [f"{r['method']} {r['fields']['steps']} steps ({r['source']})" for r in refs
                if comparability(r, [("row", fields)])[0]]
        source = "marflow evaluator, published PeRFlow delta weights" if row.get("published") else "marflow (this run)"
        lines.append(f"| {source} | {row['model']} | {row['steps']} | {row['guidance']:g} | {_fmt(row.get('fid'), 2)} | "
                     f"{_fmt(row.get('clip'), 4)} | {', '.join(same) or 'none'} |")
    if published_perflow is None:
        lines.append(f"| marflow evaluator, published PeRFlow delta weights | perflow_published | - | - | "
                     f"{NOT_PROVIDED} | {NOT_PROVIDED} | - (set sd15_eval.published_perflow.delta_weights) |")
    lines += ["", "| source | method | steps | guidance | samples | FID | CLIP | comparable with our run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ref in refs:
        f = ref["fields"]
        lines.append(f"| {ref['source']} | {ref['method']} | {f['steps']} | {f['guidance']} | {f['samples']} | "
                     f"{_fmt(ref.get('fid'), 2)} | {_fmt(ref.get('clip'), 3)} | {comparable_cell(ref, ours)} |")
    return "\n".join(lines) + "\n"
