"""The image tier's registration: its params sections, its four notebook stages, its checks."""

from __future__ import annotations

from typing import Any

from ..config import require
from ..registry import StageSpec, Tier, section
from .config import SECTIONS

CHECKPOINTS = "checkpoints/images"


def kl_students_exist(params: dict[str, Any]) -> None:
    """Every student the KL names is trained, and the KL's NFE are among the table's."""
    students = section(params, "images_students").students
    table = section(params, "table_images")
    for i, name in enumerate(table.kl.students):
        require(name in students, f"table_images.kl.students[{i}]", name,
                f"no such student in images_students.students ({sorted(students)})")
    for i, nfe in enumerate(table.kl.nfe):
        require(nfe in table.nfe, f"table_images.kl.nfe[{i}]", nfe, f"must be one of table_images.nfe {table.nfe}")


def inception_fits_heldout(params: dict[str, Any]) -> None:
    """The reference set is the held-out split: an FID set larger than it is refused."""
    images = section(params, "images")
    table = section(params, "table_images")
    if images.dataset == "digits":
        heldout = int(round(1797 * images.heldout_fraction))
        require(table.inception_samples <= heldout, "table_images.inception_samples",
                table.inception_samples, f"digits' held-out split has about {heldout} images")


def needs_labels(params: dict[str, Any]) -> str | None:
    """A stage that trains or uses the domain classifier (its FD, the class-mass metrics) is
    skipped on a dataset without class labels."""
    why = section(params, "images").labels_missing()
    return None if why is None else (f"{why}; the domain classifier, its FD and the class-mass metrics "
                                     f"need labels")


DATA = ("images",)
TIER = Tier(
    name="images",
    sections=SECTIONS,
    stages=(
        StageSpec("images_teacher", "notebooks/images_teacher.py", (*DATA, "images_teacher"),
                  "results/images/teacher", threads=2),
        StageSpec("images_reference", "notebooks/images_reference.py", (*DATA, "images_reference"),
                  "results/images/reference", threads=2, skip_rules=(needs_labels,)),
        StageSpec("images_students", "notebooks/images_students.py", (*DATA, "images_students"),
                  "results/images/students", threads=2),
        StageSpec("table_images", "notebooks/table_images.py",
                  (*DATA, "images_reference", "images_students", "table_images"), "results/images/table",
                  (kl_students_exist, inception_fits_heldout), threads=2, skip_rules=(needs_labels,)),
    ),
    persistent_outputs=tuple(f"{CHECKPOINTS}/{d}" for d in ("teacher", "reference", "students")),
)
