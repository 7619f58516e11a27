"""Every python code block of README.md and docs/*.md runs (blocks of one file share a namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
FILES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if BLOCK.search(p.read_text())]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_examples_run(path: Path) -> None:
    blocks = BLOCK.findall(path.read_text())
    ns: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.name} block {i} failed: {type(e).__name__}: {e}\n{code}") from e
