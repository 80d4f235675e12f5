"""Reading params files as DVC reads them: duplicate keys refused, YAML 1.2 numbers, located errors.

PyYAML's ``safe_load`` differs from DVC's YAML 1.2 reader in two ways that matter to a params file:

* a duplicate key (``steps: 40`` then ``steps: 4000``) is accepted, the last one winning, where DVC
  refuses the file; here it is an error naming both lines;
* ``2e-3`` is a string under YAML 1.1 (its floats need a dot: ``2.0e-3``), a number under YAML 1.2;
  here it is the number DVC sees, so marflow and DVC read the same value.

A syntax error is reported with the file, line and column of the problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class ParamsYAMLError(ValueError):
    """A params file that is not valid YAML, or has a duplicate key; the message names file and line."""


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 exponent floats and duplicate keys refused."""


#: YAML 1.2 floats that YAML 1.1 reads as strings: an exponent without a dot (``2e-3``, ``1E5``)
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")

StrictLoader.yaml_implicit_resolvers = {
    key: list(resolvers) for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            first = seen[key].start_mark
            mark = key_node.start_mark
            raise ParamsYAMLError(
                f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r} "
                f"(first at line {first.line + 1}); DVC refuses such a file too: keep one of them")
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a syntax error or a duplicate key raises ``ParamsYAMLError``
    naming the file, the line and the column."""
    path = Path(path)
    text = path.read_text()
    try:
        return yaml.load(text, Loader=_named_loader(str(path)))  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = " ".join(part for part in (err.context, err.problem) if part)
        raise ParamsYAMLError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ParamsYAMLError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def _named_loader(name: str):
    """A ``StrictLoader`` factory whose marks carry the file name ``name``."""

    def make(stream):
        loader = StrictLoader(stream)
        loader.name = name
        return loader

    return make
