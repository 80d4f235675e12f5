"""Switch the active profile: ``python -m replication.profile tiny``.

It deep-merges ``replication/profiles/tiny.yaml`` over ``params.yaml`` (the default profile) and
writes the result to ``params.yaml``.

``git checkout params.yaml`` returns to the default profile. Unknown keys in a profile are rejected
by the same validation as ``params.yaml`` itself, naming the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from marflow_core.atomic import atomic_write_text

from .config import ConfigError, deep_merge, load_params
from .registry import validate_all

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def apply_profile(name: str, params_path: Path = Path("params.yaml"),
                  profiles_dir: Path = PROFILES_DIR) -> dict:
    """Merge profile ``name`` into the params file; returns the merged params."""
    path = profiles_dir / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in profiles_dir.glob("*.yaml"))
        raise ConfigError(f"profile = {name!r}: no {path}; known profiles: {known}")
    merged = deep_merge(load_params(params_path), load_params(path))
    validate_all(merged)
    header = (f"# marflow parameters: profile '{name}' (written by `python -m replication.profile "
              f"{name}`; `git checkout params.yaml` restores the default).\n")
    atomic_write_text(header + yaml.safe_dump(merged, sort_keys=False), params_path)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a file name in replication/profiles/ without .yaml, e.g. tiny")
    parser.add_argument("--params", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    try:
        apply_profile(args.profile, args.params)
    except ConfigError as err:
        print(f"invalid profile: {err}", file=sys.stderr)
        return 2
    print(f"{args.params}: profile {args.profile} is active")
    return 0


if __name__ == "__main__":
    sys.exit(main())
