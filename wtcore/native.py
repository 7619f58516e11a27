"""`nonzero_stats`: every count a program makes of conv/linear weights, in one native pass.

Why native: torch has no single op for "per-row nonzeros, N:M block counts and per-input activity" of a
weight, so a program composes them, and on CPU each composition pays for memory it should not need: ATen
writes a full-size indicator before any reduction reads it, and inductor's code stores bool/uint8 values
~20x slower than ATen's and walks column reductions one vector strip at a time (torch 2.14.1). ResNet-50's
all-metrics program spent ~9 ms of its ~17 ms compiled (~14 of ~20 eager) there. The C kernel
(`csrc/nonzero_stats.c`) reads every weight element once and keeps the indicator of one row in L1: ~4 ms
for all of ResNet-50's weights on two threads.

It is built on first use with the C compiler found on the machine (`$CC`, else `cc`/`gcc`/`clang`; inductor
needs one too), into a cache folder keyed by the source, the compiler and the CPU (`$WT_CACHE_DIR`, else
`~/.cache/wt`), and loaded with ctypes. Where it cannot run (no compiler, `WT_NATIVE=0`, tensors off the CPU
or wrapped by `vmap`/`grad`, rows longer than 65536 entries, blocks longer than 255) the same outputs come
from torch ops (`nonzero_stats_torch`), so results never depend on which implementation ran; the tests
compare the two.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["available", "nonzero_bytes", "nonzero_bytes_op", "nonzero_stats", "nonzero_stats_op", "nonzero_stats_torch",
           "plain_cpu", "threshold_bits"]

_SOURCE = Path(__file__).parent / "csrc" / "nonzero_stats.c"
_ROW_MAX = 65536
_TASK_ELEMENTS = 1 << 15  # rows per task: about this many elements (a few per weight, many for big ones)
_WIDTH = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Weight(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("o", ctypes.c_int64), ("c", ctypes.c_int64), ("k", ctypes.c_int64),
                ("row_off", ctypes.c_int64), ("col_off", ctypes.c_int64), ("lo", ctypes.c_uint64),
                ("hi", ctypes.c_uint64), ("first", ctypes.c_void_p), ("out_col", ctypes.c_int64),
                ("width", ctypes.c_int32), ("pad", ctypes.c_int32)]


class _Task(ctypes.Structure):
    _fields_ = [("w", ctypes.c_int64), ("r0", ctypes.c_int64), ("r1", ctypes.c_int64)]


def _cache_dir() -> Path:
    root = os.environ.get("WT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wt")
    return Path(root)


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags where Linux says them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    source = _SOURCE.read_bytes()
    attempts = (["-O3", "-march=native"], ["-O3"])
    key = hashlib.sha256(source + cc.encode() + _cpu_id().encode() + platform.machine().encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = out_dir / f"nonzero_stats-{key}.so"
    if lib.exists():
        return lib
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out_dir)
        probe.close()
    except OSError:  # a read-only home: the temporary folder, per user
        out_dir = Path(tempfile.gettempdir()) / f"wt-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        out_dir.mkdir(parents=True, exist_ok=True)
        lib = out_dir / lib.name
        if lib.exists():
            return lib
    errors = []
    for flags in attempts:  # -march=native is not known to every compiler and target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-pthread", "-o", tmp, str(_SOURCE)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode == 0:
            os.replace(tmp, lib)  # atomic: concurrent builds (test workers) each install a whole file
            return lib
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {run.stderr.strip()[-500:]}")
    raise RuntimeError("building the nonzero_stats kernel failed:\n" + "\n".join(errors))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("WT_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except Exception as e:  # any failure: the torch implementation gives the same numbers
        warnings.warn(f"wt: the native nonzero_stats kernel is unavailable ({e}); programs count nonzeros "
                      "with torch ops instead (same results, slower on CPU). Set WT_NATIVE=0 to silence this.",
                      RuntimeWarning, stacklevel=3)
        return None
    fn = lib.wt_nonzero_stats
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on the first call)."""
    return _library() is not None


@functools.cache
def threshold_bits(dtype: torch.dtype, tolerance: float) -> tuple[int, int]:
    """(lo, hi) such that an element of `dtype` is nonzero (`nonzero_bytes`: `x != 0` at
    tolerance 0, NaN included; else `|x| > tolerance`, NaN excluded) exactly when the magnitude bits of its
    pattern lie in [lo, hi]. The boundary is found by asking torch itself about the neighbouring patterns, so
    the native kernel agrees with eager programs however torch rounds the tolerance for this dtype."""
    width = _WIDTH[dtype]
    itype = _INT[width]
    mag = (1 << (8 * width - 1)) - 1
    if tolerance == 0.0:
        return 1, mag
    inf = torch.tensor(float("inf"), dtype=dtype).view(itype).item()
    guess = torch.tensor(tolerance, dtype=torch.float64).clamp(max=torch.finfo(dtype).max).to(dtype)
    g = guess.view(itype).item() & mag
    cand = torch.arange(max(g - 2, 0), min(g + 3, inf + 1), dtype=torch.int64)
    above = (cand.to(itype).view(dtype).abs() > tolerance).tolist()
    lo = next((int(c) for c, a in zip(cand.tolist(), above) if a), inf + 1)
    return lo, inf


@functools.cache
def _first_mask(c: int, k: int, m: int) -> np.ndarray:
    """1 at the first k entries of every block of m * k entries of a row of c * k."""
    i = np.arange(c * k)
    return ((i % (m * k)) < k).astype(np.uint8)


class _Plan:
    """The ctypes arrays for one list of (shape, dtype), built once and reused: a call only writes the data
    pointers."""

    def __init__(self, shapes: Sequence[tuple[tuple[int, ...], torch.dtype]], tolerance: float, m: int) -> None:
        self.weights = (_Weight * len(shapes))()
        tasks: list[tuple[int, int, int]] = []
        self.masks: list[np.ndarray] = []
        row = col = out_col = 0
        for i, (shape, dtype) in enumerate(shapes):
            o, c, k = shape[0], shape[1], math.prod(shape[2:])
            lo, hi = threshold_bits(dtype, tolerance)
            w = self.weights[i]
            w.o, w.c, w.k, w.row_off, w.col_off, w.out_col = o, c, k, row, col, out_col
            w.lo, w.hi, w.width = lo, hi, _WIDTH[dtype]
            if c // m and not (k == 1 and m == 4):
                mask = _first_mask(c, k, m)
                self.masks.append(mask)
                w.first = mask.ctypes.data
            step = max(1, _TASK_ELEMENTS // max(c * k, 1))
            tasks.extend((i, r, min(r + step, o)) for r in range(0, o, step))
            row, col, out_col = row + o, col + c * k, out_col + c
        size = [math.prod(s[1:]) for s, _ in shapes]
        tasks.sort(key=lambda t: -(t[2] - t[1]) * size[t[0]])  # long tasks first: the threads finish together
        self.tasks = (_Task * len(tasks))(*[_Task(*t) for t in tasks])
        self.rows, self.cols = row, out_col


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...], tolerance: float, m: int) -> _Plan:
    return _Plan(shapes, tolerance, m)


def nonzero_stats_torch(ws: Sequence[torch.Tensor], tolerance: float, m: int, keep: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nonzero_stats` with torch ops (any device): the fallback, and what the kernel is tested against."""
    rows, cols = [], []
    for w in ws:
        o, c, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
        e = nonzero_bytes(w, tolerance).reshape(o, c, k)
        nnz = e.reshape(o, -1).sum(1, dtype=torch.int64)
        nb = c // m
        if nb:
            blk = e[:, : nb * m].reshape(o, nb, m, k).sum(2, dtype=torch.int32).reshape(o, -1)
            eq, le = (blk == keep).sum(1, dtype=torch.int64), (blk <= keep).sum(1, dtype=torch.int64)
        else:
            eq = le = torch.zeros_like(nnz)  # (like a DTensor's placements too)
        rows.append(torch.stack([nnz, eq, le]))
        cols.append(e.amax((0, 2)))
    dev = ws[0].device if ws else None
    return (torch.cat(rows, 1) if rows else torch.zeros(3, 0, dtype=torch.int64, device=dev),
            torch.cat(cols) if cols else torch.zeros(0, dtype=torch.uint8, device=dev))


def plain_cpu(w: torch.Tensor) -> bool:
    """Whether `w` is a dense CPU tensor that owns the memory it describes, so a kernel may read its data
    pointer: exactly `torch.Tensor` or `nn.Parameter` (not a DTensor, FakeTensor or other subclass), strided,
    with a storage (functorch's `vmap`/`grad` wrappers have none: asking for it raises) large enough for
    its elements. Everything else takes the torch formulation, which every tensor kind dispatches."""
    if type(w) is not torch.Tensor and type(w) is not torch.nn.Parameter:
        return False
    if w.device.type != "cpu" or w.layout != torch.strided:
        return False
    try:
        storage = w.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return False
    if w.numel() == 0:
        return True
    extent = w.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(w.shape, w.stride()))
    return storage.data_ptr() != 0 and storage.nbytes() >= extent * w.element_size()


def _native_ok(w: torch.Tensor, m: int) -> bool:
    return w.dtype in _WIDTH and math.prod(w.shape[1:]) <= _ROW_MAX and m <= 255 and plain_cpu(w)


def nonzero_stats(ws: Sequence[torch.Tensor], tolerance: float, m: int, keep: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of 2+-dim weights `[o, c, *k]`, concatenated weight after weight: `rows` int64 `[3, sum o]`
    (per output row: nonzeros, blocks of `m` consecutive inputs with exactly `keep` nonzeros, with at most
    `keep`; blocks per kernel position, `c % m` tail inputs in none) and `cols` uint8 `[sum c]` (1 where an
    input has a nonzero in some row and kernel position). Nonzero means `|w| > tolerance` (`w != 0` at 0)."""
    lib = _library()
    if lib is None or not ws or math.isinf(tolerance) or not all(_native_ok(w, m) for w in ws):
        return nonzero_stats_torch(ws, tolerance, m, keep)  # (nothing is above an infinite tolerance)
    ws = [w if w.is_contiguous() else w.contiguous() for w in ws]
    plan = _plan(tuple((tuple(w.shape), w.dtype) for w in ws), tolerance, m)
    for slot, w in zip(plan.weights, ws):
        slot.data = w.data_ptr()
    rows = torch.empty(3, plan.rows, dtype=torch.int64)
    cols = torch.empty(plan.cols, dtype=torch.uint8)
    rc = lib.wt_nonzero_stats(ctypes.addressof(plan.weights), len(ws), ctypes.addressof(plan.tasks),
                              len(plan.tasks), plan.rows, m, keep, rows.data_ptr(), cols.data_ptr(),
                              torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"wt nonzero_stats kernel failed with code {rc}")
    return rows, cols


def nonzero_bytes(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """uint8 1 where `|x| > tolerance`, else 0. At tolerance 0 it is a cast to bool (`x != 0`, NaN counts as
    nonzero), which ATen runs several times faster than the comparison on CPU; bool -> uint8 is a view."""
    hit = x.bool() if tolerance == 0.0 else x.abs() > tolerance
    return hit.view(torch.uint8)


@torch.library.custom_op("wt::nonzero_bytes", mutates_args=())
def nonzero_bytes_op(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """`nonzero_bytes` as an operator torch.compile does not look into: inductor's CPU code for bool and uint8
    *outputs* is much slower than ATen's cast, while it reads uint8 inputs fast."""
    return nonzero_bytes(x, tolerance)


@nonzero_bytes_op.register_fake
def _(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


@torch.library.custom_op("wt::nonzero_stats", mutates_args=())
def nonzero_stats_op(ws: list[torch.Tensor], tolerance: float, m: int, keep: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nonzero_stats` as an operator that torch.compile calls without looking into it (dynamo cannot trace
    the ctypes call). No autograd or vmap rule: counts have no gradient, and eager programs, which vmap and
    grad transform, call `nonzero_stats` directly (torch ops under those transforms)."""
    return nonzero_stats(ws, tolerance, m, keep)


@nonzero_stats_op.register_fake
def _(ws: list[torch.Tensor], tolerance: float, m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    dev = ws[0].device if ws else None
    return (torch.empty((3, sum(w.shape[0] for w in ws)), dtype=torch.int64, device=dev),
            torch.empty((sum(w.shape[1] for w in ws),), dtype=torch.uint8, device=dev))
