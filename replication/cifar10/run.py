"""Entry point: ``python -m replication.cifar10.run --params PARAMS.yaml --stage STAGE [--student NAME]``.

Stages, in order: ``teacher`` (flow-matching teacher), ``pairs`` (reflow pair bank, needed only by
reflow students), ``students`` (all, or ``--student NAME`` repeated), ``fid``. Training stages resume
from their checkpoints. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import load_config
from .tier import stage_fid, stage_pairs, stage_students, stage_teacher

STAGES = ("teacher", "pairs", "students", "fid")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m replication.cifar10.run", description=__doc__)
    parser.add_argument("--params", required=True, help="YAML file of the Cifar10Config mapping")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--student", action="append", help="train only this student (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    progress = not args.no_progress
    if args.stage == "teacher":
        summary = stage_teacher(cfg, progress)
    elif args.stage == "pairs":
        summary = stage_pairs(cfg, progress)
    elif args.stage == "students":
        summary = stage_students(cfg, args.student, progress)
    else:
        summary = stage_fid(cfg)
    shown = {k: v for k, v in summary.items() if k != "references"}
    print(json.dumps({"stage": args.stage, **shown}, default=str))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
