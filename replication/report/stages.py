"""The report's registration: one notebook stage that reads the other stages' metrics files.

It reads the ``images`` section too (only to state the image tier's dataset and resolution in the
protocol comparison, which no metrics file records)."""

from __future__ import annotations

from ..registry import StageSpec, Tier
from .config import SECTIONS

OUT_DIR = "results/report"
TIER = Tier(
    name="report",
    sections=SECTIONS,
    stages=(StageSpec("report", "notebooks/report.py", ("images", "report"), OUT_DIR),),
)
