"""`nonzero_stats`: every count a program makes of conv/linear weights, in one native pass.

Why native: torch has no single op for "per-row nonzeros, N:M block counts and per-input activity" of a
weight, so a program composes them, and on CPU each composition pays for memory it should not need: ATen
writes a full-size indicator before any reduction reads it, and inductor's code stores bool/uint8 values
much slower than ATen's and walks column reductions one vector strip at a time. The C++ kernel
(`csrc/nonzero_stats.cpp`: the operator `wt_native::nonzero_stats` registered with `TORCH_LIBRARY`,
`at::parallel_for` over torch's intra-op threads, dtypes by `AT_DISPATCH`) reads every weight element once
and keeps the indicator of one row in L1 (docs/design-notes.md has the measurements).

`wt::nonzero_stats` is a registered operator (`torch.library.custom_op`): its default implementation, for
every device, is the torch formulation (`nonzero_stats_torch`); on CPU the C++ kernel runs, built on first
use through `torch.utils.cpp_extension` (`wtcore.build`: once per machine, in a private cache folder). It has
a fake implementation, so `torch.compile` traces programs through it. Eager programs call the operator for
plain CPU tensors (`plain_cpu`) and the torch formulation for every other kind (DTensor, FakeTensor,
functorch wrappers, other subclasses, meta, CUDA), which those kinds dispatch op by op. Without a compiler
(or with `WT_NATIVE=0`) the torch formulation runs everywhere, with a one-line warning: results never depend
on which implementation ran; the tests compare the two.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import SpecError

__all__ = ["available", "nonzero_bytes", "nonzero_bytes_op", "nonzero_stats", "nonzero_stats_op", "nonzero_stats_torch",
           "plain_cpu", "threshold_bits"]

_SOURCE = Path(__file__).parent / "csrc" / "nonzero_stats.cpp"
_WIDTH = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def _extension() -> Any:
    """`torch.ops.wt_native` once the kernel's library is loaded, else None."""
    if os.environ.get("WT_NATIVE", "1") == "0":
        return None
    from .build import build_extension

    try:
        build_extension("wt_nonzero_stats", [_SOURCE], cflags=("-O3", "-march=native"))
        return torch.ops.wt_native
    except Exception as e:  # any failure: the torch formulation gives the same numbers
        warnings.warn(f"wt: native nonzero_stats kernel unavailable ({str(e).strip().splitlines()[-1][:200]}); "
                      "counting with torch ops (same results, slower on CPU; WT_NATIVE=0 silences this)",
                      RuntimeWarning, stacklevel=3)
        return None


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on the first call)."""
    return _extension() is not None


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


def nonzero_stats_torch(ws: Sequence[torch.Tensor], tolerance: float, m: int, keep: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nonzero_stats` with torch ops (any device): the fallback, and what the kernel is tested against."""
    _check_block(m, keep)
    rows, cols = [], []
    for w in ws:
        o, c, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
        e = nonzero_bytes(w, tolerance).reshape(o, c, k)
        nnz = e.reshape(o, c * k).sum(1, dtype=torch.int64)
        nb = c // m
        if nb:
            blk = e[:, : nb * m].reshape(o, nb, m, k).sum(2, dtype=torch.int32).reshape(o, nb * k)
            eq, le = (blk == keep).sum(1, dtype=torch.int64), (blk <= keep).sum(1, dtype=torch.int64)
        else:
            eq = le = torch.zeros_like(nnz)  # (like a DTensor's placements too)
        rows.append(torch.stack([nnz, eq, le]))
        cols.append(e.amax((0, 2)) if e.numel() else torch.zeros(c, dtype=torch.uint8, device=w.device))
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


def _native_ok(w: torch.Tensor) -> bool:
    return w.dim() >= 2 and w.dtype in _WIDTH and plain_cpu(w)


def nonzero_stats(ws: Sequence[torch.Tensor], tolerance: float, m: int, keep: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of 2+-dim weights `[o, c, *k]`, concatenated weight after weight: `rows` int64 `[3, sum o]`
    (per output row: nonzeros, blocks of `m` consecutive inputs with exactly `keep` nonzeros, with at most
    `keep`; blocks per kernel position, `c % m` tail inputs in none) and `cols` uint8 `[sum c]` (1 where an
    input has a nonzero in some row and kernel position). Nonzero means `|w| > tolerance` (`w != 0` at 0).
    The `wt::nonzero_stats` operator for plain CPU tensors, the torch formulation for every other kind."""
    _check_block(m, keep)
    if ws and all(_native_ok(w) for w in ws) and available():
        return nonzero_stats_op(list(ws), tolerance, m, keep)
    return nonzero_stats_torch(ws, tolerance, m, keep)


def _native(ws: Sequence[torch.Tensor], tolerance: float, m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    ext = _extension()
    if ext is None or not ws or math.isinf(tolerance) or not all(_native_ok(w) for w in ws):
        return nonzero_stats_torch(ws, tolerance, m, keep)  # (nothing is above an infinite tolerance)
    bits = [threshold_bits(w.dtype, tolerance) for w in ws]
    if any(lo > hi for lo, hi in bits):  # nothing is above (torch rounds the tolerance to inf): the kernel's bit
        return nonzero_stats_torch(ws, tolerance, m, keep)  # range cannot say "none"
    ws = [w if w.is_contiguous() else w.contiguous() for w in ws]
    return ext.nonzero_stats(ws, [lo for lo, _ in bits], [hi for _, hi in bits], m, keep)


def _check_block(m: int, keep: int) -> None:
    if m < 1 or not 0 <= keep <= m:
        raise SpecError(f"nonzero_stats: blocks of m={m} entries with keep={keep} nonzeros; need m >= 1 and "
                        "0 <= keep <= m")


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
    """`nonzero_stats` as a registered operator: the torch formulation on every device but the CPU, where
    the C++ kernel runs. No autograd or vmap rule: counts have no gradient, and eager programs, which vmap
    and grad transform, call the torch formulation for wrapped tensors."""
    return nonzero_stats_torch(ws, tolerance, m, keep)


@nonzero_stats_op.register_kernel("cpu")
def _(ws: list[torch.Tensor], tolerance: float, m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _native(ws, tolerance, m, keep)


@nonzero_stats_op.register_fake
def _(ws: list[torch.Tensor], tolerance: float, m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    dev = ws[0].device if ws else None
    return (torch.empty((3, sum(w.shape[0] for w in ws)), dtype=torch.int64, device=dev),
            torch.empty((sum(w.shape[1] for w in ws),), dtype=torch.uint8, device=dev))
