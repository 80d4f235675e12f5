"""The code a training run depends on: the static import closure of its modules, hashed.

A checkpoint is resumed or reused only by the same params and the same code (``runs.py``). "The
same code" is the set of project source files (``marflow_core``, ``replication``) that the run's
modules import, directly or through other project modules, found by reading their ``import``
statements (``ast``; imports inside functions count too), never by a glob of the package. So a new
method module, a new core file or an edit of a file only the SD tier uses changes no other run's
fingerprint.

Package ``__init__.py`` files that only re-export (imports, a docstring, ``__all__``,
``__version__``) are transparent: ``from marflow_core import TrainConfig`` depends on
``marflow_core/training.py``, the module ``__init__`` takes it from, and not on ``__init__.py``
itself, so exporting a new name there retrains nothing. An ``__init__.py`` with code of its own is
hashed like any module. Third-party packages are not hashed (the environment is pinned by
``constraints.txt``).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES: tuple[str, ...] = ("marflow_core", "replication")


def _file_of(module: str, root: Path) -> Path | None:
    """The source file of project module ``module`` under ``root`` (None if it is not one)."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parse(path: Path) -> ast.Module:
    return _parse_text(path.read_text(), str(path))


@cache
def _parse_text(text: str, filename: str) -> ast.Module:
    return ast.parse(text, filename=filename)


def _is_reexport_only(tree: ast.Module) -> bool:
    """Only imports, a docstring and ``__all__`` / ``__version__`` assignments."""
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id in ("__all__", "__version__") for t in node.targets):
            continue
        return False
    return True


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of a (possibly relative) ``from X import ...``."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def _source_of(module: str, name: str, root: Path) -> str:
    """The project module that ``from module import name`` really depends on: the submodule
    ``module.name``, or, through a re-export-only ``__init__``, the module it takes ``name`` from;
    otherwise ``module`` itself."""
    child = f"{module}.{name}"
    if _file_of(child, root) is not None:
        return child
    path = _file_of(module, root)
    if path is None or path.name != "__init__.py" or not _is_reexport_only(_parse(path)):
        return module
    for node in _parse(path).body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _source_of(_absolute(node, module, True), alias.name, root)
    return module


def _imports(module: str, root: Path) -> set[str]:
    """The project modules that ``module``'s import statements name (resolved to files that exist)."""
    path = _file_of(module, root)
    if path is None:
        return set()
    found: set[str] = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            found.update(_source_of(base, alias.name, root) for alias in node.names)
    return {m for m in found if _file_of(m, root) is not None}


def import_closure(modules: Iterable[str], root: Path = REPO_ROOT) -> list[Path]:
    """The project source files ``modules`` depend on (sorted; re-export-only ``__init__`` files
    are passed through, not included)."""
    seen: set[str] = set()
    todo = [m for m in modules]
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _file_of(module, root)
        if path is None:
            raise ModuleNotFoundError(f"{module}: not a module of {PROJECT_PACKAGES} under {root}")
        if not (path.name == "__init__.py" and _is_reexport_only(_parse(path))):
            files.add(path)
        todo.extend(_imports(module, root))
    return sorted(files)


def code_digest(modules: Iterable[str], root: Path = REPO_ROOT) -> str:
    """SHA-256 of the files of ``import_closure(modules)``, each with its path relative to ``root``
    (so a copy of the repository elsewhere has the same digest)."""
    digest = hashlib.sha256()
    for path in import_closure(modules, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
