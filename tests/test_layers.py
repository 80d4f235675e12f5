"""The layers and the fingerprints: tiers import only the shared layer, the harness and the core;
a run's code fingerprint is the import closure of its own modules, nothing more.

The closure rules are checked on a hand-made miniature package (where the expected closure is
known by construction), then on the real repository in a scratch copy: editing a file only the SD
tier uses, adding a core file (exported from ``marflow_core/__init__.py``) or adding a method module
changes no CPU student's fingerprint, while editing a core file that training uses changes them.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from replication.common import fingerprint
from replication.common.methods import method_module
from replication.registry import tiers

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path, module: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")[: -node.level]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


#: the report tier reads every tier's results; of another tier's code it may import only that tier's
#: ``findings`` module (sentences generated from that tier's metrics, no training or evaluation)
REPORT_MAY_IMPORT = "findings"


def test_tiers_import_no_other_tier():
    names = set(tiers())
    packages = {t: ROOT / "replication" / t for t in names}
    assert names >= {"toy2d", "images", "report"}
    for tier, folder in packages.items():
        for path in folder.glob("*.py"):
            module = f"replication.{tier}.{path.stem}"
            for imported in _imported_modules(path, module):
                parts = imported.split(".")
                if parts[0] == "replication" and len(parts) > 1 and parts[1] in names:
                    allowed = tier == "report" and len(parts) > 2 and parts[2] == REPORT_MAY_IMPORT
                    assert parts[1] == tier or allowed, f"{path.relative_to(ROOT)} imports {imported}"


def test_the_findings_modules_the_report_imports_import_no_training_code():
    """A tier's ``findings`` module interprets numbers only: it imports nothing of the library."""
    for path in (ROOT / "replication").glob(f"*/{REPORT_MAY_IMPORT}.py"):
        module = f"replication.{path.parent.name}.{path.stem}"
        imported = _imported_modules(path, module)
        assert not any(m.startswith(("marflow_core", "torch", "replication")) for m in imported), (path, imported)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_closure_of_a_miniature_package(tmp_path):
    """``from marflow_core import f`` depends on the module ``__init__`` takes ``f`` from; a
    re-export-only ``__init__`` is not hashed; relative and function-level imports count."""
    _write(tmp_path, {
        "marflow_core/__init__.py": '"""doc"""\nfrom .a import f\nfrom .b import g\n__all__ = ["f", "g"]\n',
        "marflow_core/a.py": "from .c import h\ndef f():\n    return h()\n",
        "marflow_core/b.py": "def g():\n    return 2\n",
        "marflow_core/c.py": "def h():\n    return 1\n",
        "replication/__init__.py": "",
        "replication/tier/__init__.py": "",
        "replication/tier/train.py": "import torch\nfrom marflow_core import f\n"
                                     "def run():\n    from .helpers import x\n    return f() + x\n",
        "replication/tier/helpers.py": "x = 1\n",
        "replication/tier/unused.py": "from marflow_core import g\n",
        "replication/tier/bare.py": "import marflow_core\n",
    })
    # a bare package import depends on everything the package re-exports, not on the __init__ itself
    bare = [p.relative_to(tmp_path).as_posix()
            for p in fingerprint.import_closure(["replication.tier.bare"], tmp_path)]
    assert bare == ["marflow_core/a.py", "marflow_core/b.py", "marflow_core/c.py", "replication/tier/bare.py"]
    closure = [p.relative_to(tmp_path).as_posix()
               for p in fingerprint.import_closure(["replication.tier.train"], tmp_path)]
    assert closure == ["marflow_core/a.py", "marflow_core/c.py", "replication/tier/helpers.py",
                       "replication/tier/train.py"]
    digest = fingerprint.code_digest(["replication.tier.train"], tmp_path)
    (tmp_path / "marflow_core/b.py").write_text("def g():\n    return 3\n")
    (tmp_path / "marflow_core/__init__.py").write_text(
        '"""doc"""\nfrom .a import f\nfrom .b import g\nfrom .d import k\n__all__ = ["f", "g", "k"]\n')
    (tmp_path / "marflow_core/d.py").write_text("k = 0\n")
    assert fingerprint.code_digest(["replication.tier.train"], tmp_path) == digest
    (tmp_path / "marflow_core/c.py").write_text("def h():\n    return 5\n")
    assert fingerprint.code_digest(["replication.tier.train"], tmp_path) != digest
    # an __init__ with code of its own is hashed like a module
    (tmp_path / "marflow_core/__init__.py").write_text("from .a import f\nSCALE = 2\n")
    assert "marflow_core/__init__.py" in [p.relative_to(tmp_path).as_posix() for p in
                                          fingerprint.import_closure(["replication.tier.train"], tmp_path)]


def _student_digests(root: Path) -> dict[str, str]:
    """The code digest of every CPU student (and bank) of the committed params, under ``root``."""
    from replication.config import load_params
    from replication.registry import section

    params = load_params(ROOT / "params.yaml", overlay=False)
    out = {}
    for tier, stage in (("toy2d", "toy2d_train"), ("images", "images_students")):
        module = f"replication.{tier}.tier"
        out[tier] = fingerprint.code_digest([module], root)
        for name, student in section(params, stage).students.items():
            out[f"{tier}/{name}"] = fingerprint.code_digest([module, method_module(student.method)], root)
    return out


@pytest.fixture
def scratch(tmp_path) -> Path:
    for folder in ("marflow_core", "replication"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_sd_only_edits_new_core_files_and_new_methods_retrain_no_cpu_student(scratch):
    before = _student_digests(scratch)
    assert len(set(before.values())) > 1  # the method modules differ, so do the digests
    for path in sorted((scratch / "replication" / "sd15").glob("*.py")):
        path.write_text(path.read_text() + "\n# edited\n")
    for path in sorted((scratch / "replication" / "cifar10").glob("*.py")):
        path.write_text(path.read_text() + "\n# edited\n")
    (scratch / "marflow_core" / "newthing.py").write_text("def new():\n    return 1\n")
    init = scratch / "marflow_core" / "__init__.py"
    init.write_text(init.read_text().replace('__version__', 'from .newthing import new  # noqa: E402\n__version__', 1))
    (scratch / "replication" / "methods" / "brand_new.py").write_text(
        "from replication.common.methods import Method\n"
        "METHOD = Method(name='brand_new', pairing='windows', summary='test')\n")
    assert _student_digests(scratch) == before


def test_core_training_edits_change_every_cpu_student(scratch):
    before = _student_digests(scratch)
    path = scratch / "marflow_core" / "objectives.py"
    path.write_text(path.read_text() + "\n# edited\n")
    after = _student_digests(scratch)
    assert all(after[k] != before[k] for k in before if "/" in k)
    method = scratch / "replication" / "methods" / "perflow.py"
    method.write_text(method.read_text() + "\n# edited\n")
    again = _student_digests(scratch)
    changed = {k for k in again if again[k] != after[k]}
    assert changed == {"toy2d/perflow", "toy2d/perflow_ma", "images/perflow", "images/perflow_ma"}
