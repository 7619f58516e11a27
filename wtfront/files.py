"""Writing and reading files so that nothing is lost: atomic writes and integrity checks.

Every file wt writes goes through `atomic_write`: the bytes go to a temporary file in the target's folder,
are flushed to disk (`fsync`) and renamed over the target (`os.replace`, atomic on POSIX and Windows). A full
disk, an exception or a Ctrl-C while writing leaves the previous file as it was, never a truncated one.

`torch.load` does not check the CRC-32 that every member of a `torch.save` zip archive carries, so flipped
bytes in tensor data load silently as wrong weights; `verify_archive` checks them (Python's `zipfile`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from wtcore.errors import WtError

__all__ = ["FileError", "atomic_write", "refuse_overwrite", "verify_archive"]


class FileError(WtError):
    """A file could not be written, would be overwritten without permission, or is damaged."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on success it replaces `path` atomically, on any
    failure (exceptions, KeyboardInterrupt) it is removed and `path` is untouched."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (POSIX folders can be fsynced)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_overwrite(path: str | os.PathLike[str], force: bool, flag: str = "--force") -> None:
    """Raise `FileError` when `path` exists and `force` is not set."""
    if not force and os.path.exists(path):
        raise FileError(f"{os.fspath(path)!r} exists; pass {flag} to overwrite it (or choose another --out)")


def verify_archive(path: str | os.PathLike[str], what: str = "checkpoint") -> None:
    """Check the CRC-32 of every member of a zip archive (`torch.save`'s format); raise `FileError` naming the
    damaged member. Files that are not zip archives (legacy `torch.save`, safetensors) are left to their
    reader."""
    p = os.fspath(path)
    if not zipfile.is_zipfile(p):
        return
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise FileError(f"{what} {p!r} is damaged (truncated or corrupted): {e}") from None
    if bad is not None:
        raise FileError(f"{what} {p!r} is corrupted: member {bad!r} fails its CRC-32 check (the bytes on disk are not "
                        "the bytes that were saved); restore it from a backup or re-save it")
