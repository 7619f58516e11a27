"""The package as a user meets it: versions, `wt --version`, PEP 561 markers, and a `wt` whose help and argument
errors import no torch (checked in a fresh interpreter, from sys.modules)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torch_pruning", "timm", "torchvision", "transformers", "fvcore")


def _run(argv: list[str]) -> tuple[int, list[str], str]:
    code = (
        "import json, sys\n"
        "from wtfront.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]), file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    rc, loaded = json.loads(p.stderr.strip().splitlines()[-1])
    return rc, loaded, p.stdout + p.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["analyze", "--help"], ["prune", "torchvision:x"],
                                  ["bench"], ["nosuchcommand"]])
def test_help_version_and_argument_errors_import_no_torch(argv: list[str]) -> None:
    rc, loaded, out = _run(argv)
    assert rc in (0, 2), out
    assert loaded == [], f"wt {' '.join(argv)} imported {loaded}"


def test_versions() -> None:
    import wtcore
    import wtfront

    assert wtcore.__version__ == wtfront.__version__ == version("wt")
    rc, _, out = _run(["--version"])
    assert rc == 0 and f"wt {version('wt')}" in out


def test_py_typed_ships() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.setuptools.package-data]"):].split("\n[", 1)[0]
    for pkg in ("wtcore", "wtfront"):
        assert (ROOT / pkg / "py.typed").is_file()
        line = next(ln for ln in section.splitlines() if ln.startswith(f"{pkg} ="))
        assert '"py.typed"' in line
