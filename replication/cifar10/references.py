"""The tier's reference numbers (``replication/references/cifar10.yaml``), protocols resolved."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml


def load_cifar10_references() -> dict[str, Any]:
    """``{"protocols": ..., "entries": [...]}``; raises if an entry lacks a source or a known protocol."""
    data = yaml.safe_load(resources.files("replication.references").joinpath("cifar10.yaml").read_text())
    for i, entry in enumerate(data["entries"]):
        if not entry.get("source"):
            raise ValueError(f"cifar10.yaml entries[{i}] ({entry.get('method')}): no source")
        if entry.get("protocol") not in data["protocols"]:
            raise ValueError(f"cifar10.yaml entries[{i}]: unknown protocol {entry.get('protocol')!r}")
        entry["protocol_spec"] = data["protocols"][entry["protocol"]]
    return data
