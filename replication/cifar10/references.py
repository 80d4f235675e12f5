"""The CIFAR-10 tier's reference numbers: the ``cifar10_50k`` entries of ``peers.yaml`` and the
replicated paper's row (``unknown``)."""

from __future__ import annotations

from typing import Any

from ..references import _load, load_peer_entries, paper_rows

PROTOCOL = "cifar10_50k"


def load_cifar10_references() -> dict[str, Any]:
    """``{"protocols": {PROTOCOL: ...}, "entries": [...]}``, sources and protocols checked on load."""
    entries = [e for e in load_peer_entries() if e["protocol"] == PROTOCOL]
    entries += paper_rows(PROTOCOL, "reflow / PeRFlow + MA (paper)", ("fid",))
    return {"protocols": {PROTOCOL: _load("peers.yaml")["protocols"][PROTOCOL]}, "entries": entries}
