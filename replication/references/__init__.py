"""Reference numbers: the paper's (unknown, with its claims to test) and published peer numbers.

Every entry carries its source and protocol; ``load_peer_entries`` validates that on load.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files(__package__).joinpath(name).read_text())


def load_paper() -> dict[str, Any]:
    """The paper's entry: its (unknown) numbers and the abstract's claims with their tests."""
    return _load("paper.yaml")


def load_peer_entries() -> list[dict[str, Any]]:
    """Peer entries with their protocol resolved; raises if a source or a protocol is missing."""
    data = _load("peers.yaml")
    protocols = data["protocols"]
    entries = []
    for i, entry in enumerate(data["entries"]):
        if not entry.get("source"):
            raise ValueError(f"peers.yaml entries[{i}] ({entry.get('method')}): no source")
        if entry.get("protocol") not in protocols:
            raise ValueError(f"peers.yaml entries[{i}]: unknown protocol {entry.get('protocol')!r}")
        entries.append({**entry, "protocol_spec": protocols[entry["protocol"]]})
    return entries


def paper_rows(protocol: str, method: str, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """The replicated paper's row for a table of ``protocol``: every metric ``unknown`` (its full text
    is unavailable; never invented), in the shape of a peer entry."""
    spec = _load("peers.yaml")["protocols"][protocol]
    return [{"method": method, **dict.fromkeys(metrics, "unknown"), "protocol": protocol,
             "protocol_spec": spec, "source": "arXiv 2606.29287 (full text unavailable; paper.yaml)"}]
