"""The CIFAR-10 tier's reference numbers and its comparison with them.

The references are the ``cifar10_50k`` entries of ``peers.yaml`` (Liu, Gong, Liu, "Flow Straight and
Fast", Table 1(a)) and the replicated paper's row (``unknown``). This tier trains rectified flows and
reflow / PeRFlow students without a one-step distillation, so it is compared with the table's
*undistilled* k-rectified flows; its distilled rows (``+Distill``) are another protocol
(``distillation`` differs) and never marked comparable. ``our_protocol`` states a run's fields,
``comparison_table`` writes the comparison (``replication.references.compare``).
"""

from __future__ import annotations

from typing import Any

from ..references import _load, comparable_cell, load_peer_entries, paper_rows

PROTOCOL = "cifar10_50k"
#: FID feature networks by torch-fidelity extractor name (as in ``peers.yaml``)
FID_FEATURES = {"inception-v3-compat": "Inception 2015-12-05, pool3 (2048-d)"}
CIFAR_TRAIN = 50000


def load_cifar10_references() -> dict[str, Any]:
    """``{"protocols": {PROTOCOL: ...}, "entries": [...]}``, schema checked on load."""
    entries = [e for e in load_peer_entries() if e["protocol"] == PROTOCOL]
    entries += paper_rows(PROTOCOL, "reflow / PeRFlow + MA (paper)", ("fid",))
    return {"protocols": {PROTOCOL: _load("peers.yaml")["protocols"][PROTOCOL]}, "entries": entries}


def our_protocol(n_samples: int, n_reference: int, feature_extractor: str) -> dict[str, Any]:
    """The protocol fields of a ``cifar10_fid`` run (``steps`` per row; Euler, no distillation)."""
    which = "all" if n_reference == CIFAR_TRAIN else "the first"
    return {"dataset": "CIFAR-10 (unconditional)", "samples": n_samples, "resolution": 32,
            "caption": "none (unconditional)", "reference": f"CIFAR-10 train set, {which} {n_reference} images",
            "fid_features": FID_FEATURES.get(feature_extractor, f"{feature_extractor} features"),
            "guidance": "none (unconditional)", "solver": "Euler", "distillation": "none"}


def _label(row: dict[str, Any]) -> str:
    seed = "" if row.get("seed") is None else f" seed {row['seed']}"
    return f"{row['model']}{seed} ({row['nfe']} NFE)"


def comparison_table(rows: list[dict[str, Any]], protocol: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """``(markdown, references)``: our FID rows, then every reference with ``comparable``:
    ``yes: <our rows>`` or ``no: <the fields that differ>`` (the references are returned with it)."""
    ours = [(_label(r), {**protocol, "steps": r["nfe"]}) for r in rows]
    lines = ["Our protocol: " + "; ".join(f"{k} = {v}" for k, v in protocol.items()) + ".",
             "A published row is comparable only when one of our rows agrees with it on every protocol "
             "field (replication/references/peers.yaml); `unknown` agrees with nothing. The distilled "
             "rows (+Distill) are a one-step distillation, another protocol. Our UNet is DDPM's, not "
             "the DDPM++ of the published rows: comparable protocols, different architectures.",
             "", "| model | seed | NFE | FID |", "| --- | --- | --- | --- |"]
    for row in rows:
        seed = '-' if row.get('seed') is None else row['seed']
        lines.append(f"| {row['model']} | {seed} | {row['nfe']} | {row['fid']:.2f} |")
    refs = []
    lines += ["", "| source | method | solver | steps | distillation | FID | comparable with our run |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for ref in load_cifar10_references()["entries"]:
        f = ref["fields"]
        cell = comparable_cell(ref, ours)
        fid = ref["fid"] if isinstance(ref["fid"], str) else f"{ref['fid']:g}"
        lines.append(f"| {ref['source']} | {ref['method']} | {f['solver']} | {f['steps']} | {f['distillation']} | "
                     f"{fid} | {cell} |")
        refs.append({k: v for k, v in ref.items() if k != "protocol_spec"} | {"comparable": cell})
    return "\n".join(lines) + "\n", refs
