"""Reference numbers: the paper's (unknown, with its claims to test) and published peer numbers, each
with the protocol it was measured under, and the rule that says when one of ours is comparable.

Schema (``peers.yaml``, checked by ``load_peer_entries``): every protocol names its ``source`` and
gives every field of ``PROTOCOL_FIELDS`` plus its own ``extra_fields``; an entry names its ``source``
(paper + table, or repository + file), its ``protocol``, and may set any protocol field itself
(``steps``, ``guidance``, ...). After the entry's fields override its protocol's, every field must be
there: a value the source does not state is written ``unknown``, never left out. ``compare`` refuses a
match on any field that differs, and ``unknown`` (published or ours) never matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

#: the fields every protocol states (``unknown`` where its source does not):
#: dataset/split, sample count, resolution, caption rule, reference set and its preprocessing,
#: FID feature network, sampling guidance and sampling steps
PROTOCOL_FIELDS: tuple[str, ...] = ("dataset", "samples", "resolution", "caption", "reference",
                                    "fid_features", "guidance", "steps")
#: keys of an entry or protocol that are not protocol fields
NON_FIELDS = frozenset({"method", "base", "source", "checked", "note", "protocol", "metrics", "extra_fields",
                        "metric_code", "fid", "clip"})
UNKNOWN = "unknown"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files(__package__).joinpath(name).read_text())


def load_paper() -> dict[str, Any]:
    """The paper's entry: its (unknown) numbers, each with its (unknown) protocol, and the abstract's
    claims with their tests; the schema is checked (``check_paper``)."""
    paper = _load("paper.yaml")
    check_paper(paper)
    return paper


def check_paper(paper: dict[str, Any]) -> None:
    """Every number of ``paper.yaml`` has a source, a value, and every protocol field."""
    for i, number in enumerate(paper["numbers"]):
        where = f"paper.yaml numbers[{i}] ({number.get('metric')})"
        if not number.get("source"):
            raise ValueError(f"{where}: no source")
        protocol = number.get("protocol") or {}
        missing = [f for f in PROTOCOL_FIELDS if protocol.get(f) in (None, "")]
        if missing:
            raise ValueError(f"{where}: protocol lacks {missing} (write `unknown` where it is not known)")


def protocol_fields(spec: dict[str, Any]) -> tuple[str, ...]:
    """The fields compared for a protocol: ``PROTOCOL_FIELDS`` and its ``extra_fields``."""
    return PROTOCOL_FIELDS + tuple(spec.get("extra_fields", ()))


def check_peers(data: dict[str, Any]) -> None:
    """The ``peers.yaml`` schema (module doc); raises ``ValueError`` naming the entry and the field."""
    protocols = data["protocols"]
    for name, spec in protocols.items():
        if not spec.get("source"):
            raise ValueError(f"peers.yaml protocols.{name}: no source")
        if not spec.get("metrics"):
            raise ValueError(f"peers.yaml protocols.{name}: no metrics listed")
    for i, entry in enumerate(data["entries"]):
        where = f"peers.yaml entries[{i}] ({entry.get('method')})"
        if not entry.get("source"):
            raise ValueError(f"{where}: no source")
        if entry.get("protocol") not in protocols:
            raise ValueError(f"{where}: unknown protocol {entry.get('protocol')!r}")
        spec = protocols[entry["protocol"]]
        resolved = resolve(entry, spec)
        missing = [f for f in protocol_fields(spec) if resolved.get(f) in (None, "")]
        if missing:
            raise ValueError(f"{where}: no {missing} (write `unknown` where the source does not state it)")
        stray = sorted(set(entry) - NON_FIELDS - set(protocol_fields(spec)))
        if stray:
            raise ValueError(f"{where}: {stray} are not fields of protocol {entry['protocol']!r} "
                             f"({list(protocol_fields(spec))})")
        for metric in spec["metrics"]:
            value = entry.get(metric)
            if not (value == UNKNOWN or isinstance(value, int | float)):
                raise ValueError(f"{where}: {metric} = {value!r}: a number or `unknown`")


def resolve(entry: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The protocol fields of ``entry``: its protocol's, overridden by the entry's own."""
    return {f: entry.get(f, spec.get(f)) for f in protocol_fields(spec)}


def load_peer_entries() -> list[dict[str, Any]]:
    """Peer entries, schema-checked, each with ``protocol_spec`` (its protocol's description) and
    ``fields`` (every protocol field resolved)."""
    data = _load("peers.yaml")
    check_peers(data)
    protocols = data["protocols"]
    return [{**entry, "protocol_spec": protocols[entry["protocol"]],
             "fields": resolve(entry, protocols[entry["protocol"]])} for entry in data["entries"]]


def paper_rows(protocol: str, method: str, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """The replicated paper's row for a table of ``protocol``: every metric and every protocol field
    ``unknown`` (its full text is unavailable; never invented), in the shape of a peer entry."""
    spec = _load("peers.yaml")["protocols"][protocol]
    return [{"method": method, **dict.fromkeys(metrics, UNKNOWN), "protocol": protocol, "protocol_spec": spec,
             "fields": dict.fromkeys(protocol_fields(spec), UNKNOWN),
             "source": "arXiv 2606.29287 (full text unavailable; paper.yaml)"}]


@dataclass(frozen=True)
class Difference:
    """One protocol field on which a published row and ours differ (``unknown`` on either side counts)."""

    field: str
    published: Any
    ours: Any

    def __str__(self) -> str:
        return f"{self.field} (published {_show(self.published)}; ours {_show(self.ours)})"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 10 else f"{value:g}"
    return str(value)


def same_value(a: Any, b: Any) -> bool:
    """Whether two protocol values agree: numbers by value, text ignoring case and spacing; ``unknown``
    (or a missing value) agrees with nothing, itself included."""
    if a is None or b is None or UNKNOWN in (a, b):
        return False
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return " ".join(str(a).split()).casefold() == " ".join(str(b).split()).casefold()


def compare(published: dict[str, Any], ours: dict[str, Any], fields: tuple[str, ...]) -> list[Difference]:
    """The fields of ``fields`` on which ``published`` and ``ours`` differ (empty: comparable)."""
    return [Difference(f, published.get(f, UNKNOWN), ours.get(f, UNKNOWN)) for f in fields
            if not same_value(published.get(f), ours.get(f))]


def comparability(ref: dict[str, Any], ours: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[Difference]]:
    """``(labels of our rows with exactly ref's protocol, differences to the closest of ours)``.

    ``ref`` is a loaded entry (``fields``, ``protocol_spec``); ``ours`` pairs each of our rows'
    label with its protocol fields. The differences are empty when some row matches, else those of
    the row with the fewest (the first such row)."""
    fields = protocol_fields(ref["protocol_spec"])
    diffs = [(label, compare(ref["fields"], row, fields)) for label, row in ours]
    matches = [label for label, d in diffs if not d]
    if matches or not diffs:
        return matches, []
    return [], min(diffs, key=lambda item: len(item[1]))[1]


def comparable_cell(ref: dict[str, Any], ours: list[tuple[str, dict[str, Any]]]) -> str:
    """A table cell: ``yes: <our rows>`` or ``no: <field (published ...; ours ...)>, ...``."""
    matches, diffs = comparability(ref, ours)
    if matches:
        return "yes: " + ", ".join(matches)
    if not diffs:
        return "no: none of our rows ran"
    return "no: " + "; ".join(str(d) for d in diffs)
