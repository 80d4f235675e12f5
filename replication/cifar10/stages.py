"""The CIFAR-10 tier's registration: its sections (in ``replication/gpu/params.yaml``), its four
module stages (``python -m replication.stage cifar10_teacher`` etc., the GPU DVC project's commands)
and its cross-section check."""

from __future__ import annotations

from typing import Any

from ..common.students import unused_pairing_sections
from ..config import require
from ..registry import ModuleStage, Tier, section
from .config import CHECKPOINTS, PAIRING_SECTIONS, SECTIONS


def pairs_have_effect(params: dict[str, Any]) -> None:
    """A ``cifar10_pairs`` section with no student on teacher pairs has no effect: refused."""
    unused = unused_pairing_sections(section(params, "cifar10_students").students, PAIRING_SECTIONS)
    pairs = PAIRING_SECTIONS["teacher_pairs"]
    require(pairs not in params or pairs not in unused, pairs, params.get(pairs),
            f"has no effect: {unused.get(pairs)}; remove the section and the cifar10_pairs stage "
            f"(replication/gpu/dvc.yaml)")


BASE = ("cifar10",)
TIER = Tier(
    name="cifar10",
    sections=SECTIONS,
    stages=(
        ModuleStage("cifar10_teacher", "replication.cifar10.tier:stage_teacher", (*BASE, "cifar10_teacher")),
        ModuleStage("cifar10_pairs", "replication.cifar10.tier:stage_pairs", (*BASE, "cifar10_pairs")),
        ModuleStage("cifar10_students", "replication.cifar10.tier:stage_students",
                    (*BASE, "cifar10_pairs", "cifar10_students"), (pairs_have_effect,)),
        ModuleStage("cifar10_fid", "replication.cifar10.evaluate:stage_fid",
                    (*BASE, "cifar10_students", "cifar10_fid")),
    ),
    persistent_outputs=tuple(f"{CHECKPOINTS}/{d}" for d in ("teacher", "pairs", "students")),
    params_file="replication/gpu/params.yaml",
)
