"""`wtcore.build`: the cache folder's checks, concurrent first builds and a corrupt cached library.

The builds use a one-operator source (fast to compile) in subprocesses: each process is a "first use" on a
fresh cache folder, and an operator library cannot be loaded twice into one process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from wtcore.build import InsecureCacheError, cache_root, secure_dir

SOURCE = """
#include <torch/library.h>
int64_t add(int64_t a, int64_t b) { return a + b; }
TORCH_LIBRARY(wt_build_test, m) { m.def("add(int a, int b) -> int", &add); }
"""

SCRIPT = """
import sys, torch
from pathlib import Path
from wtcore.build import build_extension
folder = build_extension("wt_build_test", [Path(sys.argv[1])])
print(torch.ops.wt_build_test.add(2, 3), folder)
"""


def test_cache_folder_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("WT_CACHE_DIR", str(tmp_path / "a" / "wt"))
    root = cache_root()
    assert root == tmp_path / "a" / "wt" and stat.S_IMODE(os.stat(root).st_mode) == 0o700


def test_a_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o777, 0o770, 0o702):
        shared.chmod(mode)
        with pytest.raises(InsecureCacheError, match="can be written by other users"):
            secure_dir(shared)
    shared.chmod(0o755)  # readable by others is fine, writable is not
    assert secure_dir(shared) == shared


def test_a_folder_of_another_user_or_a_link_is_refused(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(mine).st_uid + 1)
    with pytest.raises(InsecureCacheError, match="owned by uid"):
        secure_dir(mine)
    monkeypatch.undo()
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(InsecureCacheError, match="not a directory"):
        secure_dir(link)


def _start(tmp_path: Path, cache: Path) -> subprocess.Popen:
    src = tmp_path / "add.cpp"
    src.write_text(SOURCE)
    env = {**os.environ, "WT_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(src)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> Path:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    value, folder = out.split()[-2:]
    assert value == "5"
    return Path(folder)


@pytest.mark.slow
def test_concurrent_first_builds_build_once_and_a_corrupt_library_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    procs = [_start(tmp_path, cache) for _ in range(2)]  # two ranks starting together on a fresh machine
    folders = {_finish(p) for p in procs}
    assert len(folders) == 1
    folder = folders.pop()
    log = (folder / ".ninja_log").read_text().splitlines()
    # linked once: the second process waited for the first, then found the library built
    assert sum(line.split("\t")[3].endswith(".so") for line in log[1:]) == 1, log
    lib = next(folder.glob("*.so"))
    lib.write_bytes(b"not a library")
    assert _finish(_start(tmp_path, cache)) == folder
    assert lib.read_bytes()[:4] == b"\x7fELF"


def test_without_a_compiler_one_warning_and_the_same_counts(monkeypatch):
    import torch

    import wtcore.build
    from wtcore import native

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(wtcore.build, "build_extension", no_compiler)
    native._extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native nonzero_stats kernel unavailable") as record:
            assert not native.available()
        assert len(record) == 1 and "\n" not in str(record[0].message)
        w = torch.randn(6, 8, 3)
        got = native.nonzero_stats([w], 0.0, 4, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, native.nonzero_stats_torch([w], 0.0, 4, 2)))
    finally:
        monkeypatch.undo()
        native._extension.cache_clear()
