"""The one student spec of every tier: method, windows, MA on or off with its overrides, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from marflow_core.errors import InvalidParameter
from marflow_core.marginal import MAConfig

from ..config import require
from .methods import Method, method_record


@dataclass
class StudentSpec:
    """One student of a tier's ``students`` mapping.

    ``method`` names a method module (``replication/methods/<name>.py``); ``windows`` is its window
    count ``K`` (a method may fix it: reflow has ``K = 1``); ``ma`` adds the marginal-alignment term
    with the tier's shared ``ma`` settings, of which ``ma_weight`` (``lambda``) and ``ma_substeps``
    (``n``) may be overridden for this student; ``seeds`` are its training seeds (one run each).
    """

    method: str
    windows: int = 1
    ma: bool = False
    ma_weight: float | None = None
    ma_substeps: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])

    def validate(self, where: str) -> None:
        try:
            record = method_record(self.method)
        except InvalidParameter as err:
            require(False, f"{where}.method", err.value, err.why)
        require(self.windows >= 1, f"{where}.windows", self.windows, "K must be >= 1")
        if record.windows is not None:
            require(self.windows == record.windows, f"{where}.windows", self.windows,
                    f"{self.method} uses K = {record.windows}")
        require(not self.ma or record.supports_ma, f"{where}.ma", self.ma,
                f"method {self.method!r} does not take the MA term")
        if self.ma_weight is not None:
            require(self.ma_weight >= 0, f"{where}.ma_weight", self.ma_weight, "lambda must be >= 0")
        if self.ma_substeps is not None:
            require(self.ma_substeps >= 1, f"{where}.ma_substeps", self.ma_substeps, "must be >= 1")
        require(len(self.seeds) >= 1, f"{where}.seeds", self.seeds, "need at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), f"{where}.seeds", self.seeds, "seeds repeat")

    def inactive_fields(self) -> dict[str, str]:
        if self.ma:
            return {}
        return dict.fromkeys(("ma_weight", "ma_substeps"), "this student has ma: false")

    @property
    def record(self) -> Method:
        """The student's method record."""
        return method_record(self.method)

    def ma_config(self, shared: MAConfig) -> MAConfig | None:
        """The tier's shared MA settings with this student's overrides; None without MA."""
        if not self.ma:
            return None
        overrides = {}
        if self.ma_weight is not None:
            overrides["weight"] = self.ma_weight
        if self.ma_substeps is not None:
            overrides["substeps"] = self.ma_substeps
        return replace(shared, **overrides)


def check_window_weights(students: dict[str, StudentSpec], shared: MAConfig, where: str) -> None:
    """With ``ma.window_weights`` set, every MA student has one weight per window."""
    for name, student in students.items():
        ma = student.ma_config(shared)
        weights = ma.window_weights if ma is not None else None
        require(weights is None or len(weights) == student.windows, f"{where}.ma.window_weights",
                weights, f"needs one weight per window; student {name!r} has K = {student.windows}")


def unused_pairing_sections(students: dict[str, StudentSpec], sections: dict[str, str]) -> dict[str, str]:
    """``{section: reason}`` for the pairing sections (``{pairing: section}``) no student uses, and
    ``ma`` when no student has MA: the inactive-section rule of every tier."""
    used = {student.record.pairing for student in students.values()}
    unused = {section: f"no student's method uses {pairing} (methods: "
              f"{sorted({s.method for s in students.values()})})"
              for pairing, section in sections.items() if pairing not in used}
    if not any(s.ma for s in students.values()):
        unused["ma"] = "no student has ma: true"
    return unused
