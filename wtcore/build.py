"""Build a C++ extension once per machine, into a cache folder only the user can write.

`torch.utils.cpp_extension.load` compiles with ninja and imports the result. Around it, this module makes the
build safe to share: the folder (`$WT_CACHE_DIR`, else `$XDG_CACHE_HOME/wt` or `~/.cache/wt`; where that
cannot be written, `<tmp>/wt-<uid>`) is created with mode 0700 and must be a real directory owned by the
user that no one else can write — otherwise nothing is built or loaded from it, since a library planted
there would run as the user. The build is named by a hash of its sources, flags, torch version and CPU, so a
changed source never loads a stale library; an exclusive file lock serializes processes that start
together (DDP ranks, test workers): the first builds, the others wait and load its result. A library that
exists but does not load (a truncated or corrupt file) is removed and rebuilt once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["InsecureCacheError", "build_extension", "cache_root", "secure_dir"]


class InsecureCacheError(RuntimeError):
    """The cache folder could be written by someone else: nothing is built or loaded from it."""


def _configured_root() -> Path:
    root = os.environ.get("WT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wt")
    return Path(root)


def secure_dir(path: Path) -> Path:
    """`path`, created with mode 0700 if missing, checked to be a directory (not a link) owned by this user
    and writable by no one else; raises `InsecureCacheError` otherwise."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InsecureCacheError(f"{path} is not a directory (a symbolic link?); set WT_CACHE_DIR to a private folder")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise InsecureCacheError(f"{path} is owned by uid {st.st_uid}, not by this user ({os.getuid()}); "
                                 "set WT_CACHE_DIR to a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InsecureCacheError(f"{path} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                                 f"run `chmod 700 {path}` or set WT_CACHE_DIR to a private folder")
    return path


def cache_root() -> Path:
    """The checked cache folder: the configured one, or a per-user folder under the temporary directory
    when the configured one cannot be created (a read-only home)."""
    root = _configured_root()
    try:
        return secure_dir(root)
    except InsecureCacheError:
        raise
    except OSError:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        return secure_dir(Path(tempfile.gettempdir()) / f"wt-{uid}")


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags where Linux says them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _key(sources: Sequence[Path], cflags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(s.read_bytes())
    for part in (*cflags, torch.__version__, sys.version, platform.machine(), _cpu_id()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _load(name: str, sources: Sequence[Path], folder: Path, cflags: Sequence[str]) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(name=name, sources=[str(s) for s in sources], build_directory=str(folder),
                       extra_cflags=list(cflags), is_python_module=False, verbose=False)


def build_extension(name: str, sources: Sequence[Path], cflags: Sequence[str] = ("-O3",)) -> Path:
    """Build `sources` (C++ registering operators with `TORCH_LIBRARY`) at most once per machine and content,
    and load the library into this process (its operators appear under `torch.ops`); returns its folder.
    Raises when it cannot be built (no compiler, no ninja, an insecure folder)."""
    import fcntl  # (POSIX; elsewhere the ImportError makes callers take their torch path)

    sources = [Path(s) for s in sources]
    full = f"{name}_{_key(sources, cflags)}"
    root = cache_root()
    folder = secure_dir(root / full)
    with open(os.open(root / f"{full}.lock", os.O_RDWR | os.O_CREAT, 0o600), "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then find the library built
        try:
            try:
                _load(full, sources, folder, cflags)
            except (ImportError, OSError):  # a library that does not load (truncated, corrupt): rebuilt
                shutil.rmtree(folder)
                secure_dir(folder)
                _load(full, sources, folder, cflags)
            return folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
