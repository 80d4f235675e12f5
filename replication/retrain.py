"""Retrain from scratch: ``python -m replication.retrain``.

``dvc repro -f`` re-executes every stage, but a training stage resumes from its persisted
checkpoints when they were made with the same params and library code, so a finished run is not
retrained. This command deletes the persisted outputs of every tier's training stages (listed by
each tier's ``persistent_outputs``) and then runs ``dvc repro -f``, so every student is trained anew.
The ``.gitignore`` files DVC writes beside its outputs are committed, so they are kept: a stage not
re-executed (``--stage``) would not write its folder's ``.gitignore`` again.
``--tier NAME`` (repeatable) limits both to that tier's outputs and stages.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .registry import tiers

REPO_ROOT = Path(__file__).resolve().parents[1]


def root_tiers() -> dict:
    """The tiers of the root DVC project (their sections live in ``params.yaml``); the GPU tiers
    have their own project in ``replication/gpu/``."""
    return {name: t for name, t in tiers().items() if t.params_file == "params.yaml"}


def persistent_outputs(tier_names: list[str] | None = None) -> list[Path]:
    chosen = root_tiers() if not tier_names else {n: root_tiers()[n] for n in tier_names}
    return [REPO_ROOT / out for tier in chosen.values() for out in tier.persistent_outputs]


def delete_keeping_gitignores(path: Path) -> None:
    """Delete ``path`` (a file or a folder tree), except every ``.gitignore`` below it (DVC's, committed)
    and the folders that hold one."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for child in path.iterdir():
        if child.name != ".gitignore":
            delete_keeping_gitignores(child)
    if not any(path.iterdir()):
        path.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", action="append", help="only this tier (repeatable); default all")
    parser.add_argument("--stage", action="append", help="re-execute only this stage (repeatable; default: "
                        "every stage of the chosen tiers); the tiers' checkpoints are deleted all the same")
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tier or []) - set(root_tiers()))
    if unknown:
        name = unknown[0]
        why = (f"its stages run in the DVC project of {Path(tiers()[name].params_file).parent}/ "
               f"(delete its outputs there and run `dvc repro -f` in that folder)"
               if name in tiers() else "unknown tier")
        print(f"error: tier {name!r}: {why}; tiers of this project: {sorted(root_tiers())}",
              file=sys.stderr)
        return 2
    chosen = [s.name for name in (args.tier or root_tiers()) for s in root_tiers()[name].stages]
    stray = sorted(set(args.stage or []) - set(chosen))
    if stray:
        print(f"error: stage {stray[0]!r} is not a stage of the chosen tiers; stages: {chosen}", file=sys.stderr)
        return 2
    for path in persistent_outputs(args.tier):
        print(f"{'would delete' if args.dry_run else 'deleting'} {path.relative_to(REPO_ROOT)}")
        if not args.dry_run:
            delete_keeping_gitignores(path)
    if args.dry_run:
        return 0
    targets = args.stage or ([] if not args.tier else chosen)
    return subprocess.call(["dvc", "repro", "-f", *targets], cwd=REPO_ROOT)


if __name__ == "__main__":
    sys.exit(main())
