"""Every python code block of README.md and docs/*.md runs (blocks of one file share a namespace), and so does
every `wt ...` line of their bash blocks (after the file's python blocks, in the same temporary directory)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
BASH = re.compile(r"```bash\n(.*?)```", re.S)


def wt_lines(text: str) -> list[str]:
    """Lines of bash blocks that run the `wt` command (continuation lines joined)."""
    out = []
    for block in BASH.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("wt "):
                out.append(line)
    return out


FILES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
         if BLOCK.search(p.read_text()) or wt_lines(p.read_text())]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    text = path.read_text()
    blocks = BLOCK.findall(text)
    ns: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.name} block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    from wtfront.cli import main

    for line in wt_lines(text):
        argv = shlex.split(line, comments=True)[1:]
        code = main(argv)
        assert code == 0, f"{path.name}: `{line}` exited with {code}: {capsys.readouterr().err}"
