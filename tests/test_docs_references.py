"""Docs and docstrings point only at what a reader of the repository can see.

No link or path outside the repository (``../shared/...``) and no mention of
material a reader does not have ("the seed"): say what is meant instead.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = re.compile(r"\.\./shared/|\bthe seed\b|\bseed's\b|\bseed tutorial\b", re.I)


def _files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for package in ("zrpc", "cli", "broker", "workers", "cluster", "examples", "bench"):
        files += sorted((ROOT / package).rglob("*.py"))
    files += sorted(p for p in (ROOT / "zrpc" / "web").rglob("*.js") if "node_modules" not in p.parts
                    and "vendor" not in p.parts)
    return files


def test_no_reference_to_material_outside_the_repository() -> None:
    found = []
    for path in _files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
