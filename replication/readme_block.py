"""Keep a generated block of the README equal to the file a stage generated.

The README carries copies of generated summaries (``results/images/table/summary.md``) between
``<!-- generated: PATH -->`` and ``<!-- end generated -->``; ``python -m replication.readme_block``
rewrites every such block from its file, and ``tests/test_docs.py`` fails when one differs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- generated: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def blocks(readme: str) -> list[tuple[str, str]]:
    """``(path, body)`` of every generated block of ``readme``."""
    return [(m["path"], m["body"]) for m in BLOCK.finditer(readme)]


def synced(readme: str, root: Path) -> str:
    """``readme`` with every block's body replaced by its file's text (relative to ``root``)."""
    def body(match: re.Match) -> str:
        path = root / match["path"]
        if not path.is_file():
            raise FileNotFoundError(f"README block names {match['path']}, which does not exist: run "
                                    f"dvc repro first")
        return match.group(1) + path.read_text() + match.group(4)

    return BLOCK.sub(body, readme)


def main(argv: list[str] | None = None) -> int:
    readme = Path(argv[0] if argv else "README.md")
    text = readme.read_text()
    new = synced(text, readme.resolve().parent)
    if new != text:
        readme.write_text(new)
        print(f"{readme}: {len(blocks(new))} generated block(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
