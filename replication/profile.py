"""Switch the active profile: ``python -m replication.profile tiny``.

A profile is an overlay, ``replication/profiles/<name>.yaml``, that every stage merges over
``params.yaml`` when it loads its params (``replication.config.load_params``). Switching rewrites
only the ``profile:`` line of ``params.yaml``; its comments and every other line stay as they are,
and ``python -m replication.profile default`` (or ``git checkout params.yaml``) switches back. DVC
sees the switch (every stage reads the ``profile`` parameter and depends on the active overlay file)
and reruns what it changes.

``--scratch DIR`` leaves the work tree alone: it copies the project (tracked and untracked files
that git does not ignore, without ``results/`` and ``dvc.lock``) into ``DIR``, makes it a git
repository and switches the copy, so a smoke run there rewrites no committed file of yours.
Unknown keys in a profile are rejected by the same validation as ``params.yaml`` itself.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from marflow_core.atomic import atomic_write_text

from .config import PROFILES_DIR, ConfigError, deep_merge, load_params, profile_path
from .registry import validate_all

REPO_ROOT = Path(__file__).resolve().parents[1]
_PROFILE_LINE = re.compile(r"^profile:[ \t]*[^\s#]+", re.MULTILINE)


def apply_profile(name: str, params_path: Path = Path("params.yaml"),
                  profiles_dir: Path = PROFILES_DIR) -> dict:
    """Make ``name`` the active profile of ``params_path``; returns the merged params."""
    overlay = load_params(profile_path(name, profiles_dir), overlay=False)
    merged = deep_merge(load_params(params_path, overlay=False), overlay)
    validate_all({**merged, "profile": name})
    text = Path(params_path).read_text()
    if not _PROFILE_LINE.search(text):
        raise ConfigError(f"{params_path}: no top-level `profile:` line to switch")
    atomic_write_text(_PROFILE_LINE.sub(f"profile: {name}", text, count=1), params_path)
    return {**merged, "profile": name}


def project_files(root: Path = REPO_ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files, without the committed results and dvc.lock."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return [f for f in out if f and not f.startswith("results/") and f != "dvc.lock"
            and (root / f).is_file()]


def scratch_copy(name: str, target: Path, root: Path = REPO_ROOT) -> Path:
    """A copy of the project in ``target`` (a new git repository) with profile ``name`` active."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"--scratch {target}: the folder exists and is not empty")
    for rel in project_files(root):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target / rel)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    apply_profile(name, target / "params.yaml", target / "replication" / "profiles")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a file name in replication/profiles/ without .yaml, e.g. tiny")
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="switch a fresh copy of the project in this folder instead")
    args = parser.parse_args(argv)
    try:
        if args.scratch is not None:
            target = scratch_copy(args.profile, args.scratch)
            print(f"{target}: a copy of the project with profile {args.profile} active; run "
                  f"`dvc repro` there")
            return 0
        apply_profile(args.profile, args.params)
    except ConfigError as err:
        print(f"invalid profile: {err}", file=sys.stderr)
        return 2
    print(f"{args.params}: profile {args.profile} is active")
    return 0


if __name__ == "__main__":
    sys.exit(main())
