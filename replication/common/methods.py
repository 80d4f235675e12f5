"""One record per distillation method, read by validation, bank preparation, training and evaluation.

A method lives in its own module ``replication/methods/<name>.py`` that defines ``METHOD``; a
student's ``method: <name>`` is resolved by that module name (``method_record``), never compared as
a string anywhere else, and an unknown name is an error listing the known ones. Resolving by name
keeps each student's code fingerprint to its own method's module.

What a record says:

* ``pairing``: how its training pairs are made. ``"teacher_pairs"``: a bank of teacher ODE pairs
  ``(x0, Phi^T_{0->1}(x0))`` (reflow); ``"windows"``: window starts ``(1 - t_k) eps + t_k x1`` from
  noised data and the teacher's solve over the window (PeRFlow). Each tier maps a pairing onto its
  own builder and config section (the 2-D tier solves windows online, the image tier from a bank).
* ``windows``: a fixed window count (reflow: 1), or None for the student's own ``windows``.
* ``distance``: the trajectory distance of ``L_TM`` (``marflow_core.TrajectoryDistance``).
* ``supports_ma``: whether the marginal-alignment term may be added.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

from marflow_core.errors import InvalidParameter
from marflow_core.trajectory import TrajectoryDistance, squared_distance

PAIRINGS: tuple[str, ...] = ("teacher_pairs", "windows")
METHODS_PACKAGE = "replication.methods"


@dataclass(frozen=True)
class Method:
    """A distillation method (see the module docstring); ``summary`` is one line for tables."""

    name: str
    pairing: str
    summary: str
    windows: int | None = None
    distance: TrajectoryDistance = squared_distance
    supports_ma: bool = True

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise InvalidParameter("pairing", self.pairing, f"one of {PAIRINGS}")
        if self.windows is not None and self.windows < 1:
            raise InvalidParameter("windows", self.windows, "K must be >= 1")


def known_methods() -> list[str]:
    """The names of every method module in ``replication/methods/`` (none is imported)."""
    package = importlib.import_module(METHODS_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


def method_module(name: str) -> str:
    """The dotted module of method ``name``; an unknown name raises ``InvalidParameter``."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or \
            importlib.util.find_spec(f"{METHODS_PACKAGE}.{name}") is None:
        raise InvalidParameter("method", name, f"unknown method; known methods: {known_methods()} "
                               f"(a method is a module replication/methods/<name>.py)")
    return f"{METHODS_PACKAGE}.{name}"


def method_record(name: str) -> Method:
    """The ``METHOD`` record of ``replication/methods/<name>.py``."""
    module = importlib.import_module(method_module(name))
    record = getattr(module, "METHOD", None)
    if not isinstance(record, Method) or record.name != name:
        raise InvalidParameter("method", name, f"{Path(module.__file__).name} must define "
                               f"METHOD = Method(name={name!r}, ...)")
    return record
