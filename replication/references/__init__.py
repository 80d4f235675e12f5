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
