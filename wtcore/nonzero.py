"""The packed nonzero indicator: one byte per weight element, shared by every count a program makes.

Unit activity (the compiler's `nnz` unit reduction), zero counts (unstructured sparsity and BOPs) and N:M
block counts all start from the same `nonzero_bytes(w, tolerance)` value, emitted through the hash-consing
builder, so a weight is read once for all of them and the large intermediate is a byte per element (a
float indicator is four, and `sign(|w|)` took two full-size float passes). Everything downstream is an
exact integer reduction: block counts (`block4_count` for the contiguous blocks of linear and 1x1-conv
weights, byte adds otherwise), row counts (from the block counts when some spec made them), column counts
(one byte reduction over the leading dim).

The functions emit identical equations whoever calls them (compiler or spec), which is what makes the
sharing work: change them in one place only.
"""

from __future__ import annotations

import functools
import math

import torch

from .lang import Builder, Var

__all__ = ["block_counts", "col_any", "indicator", "row_any", "sum_dtype", "total_count"]


#: compiled programs (`backend=`) count in int32 from a comparison: inductor fuses that into its loops, while
#: the eager formulation's byte views and int32 bitcasts make it emit far slower code (measured ~30x)
_INT32 = torch.zeros((), dtype=torch.int32)


def indicator(b: Builder, p: Var, tolerance: float, fused: bool = False) -> Var:
    """1 where |w| > tolerance, shape of the parameter: uint8 (eager), int32 (`fused`, for torch.compile)."""
    if fused:
        hit = b.emit("ne", p, 0) if tolerance == 0.0 else b.gt(b.abs(p), float(tolerance))
        return b.cast_like(hit, b.const(_INT32, "int32"))
    return b.emit("nonzero_bytes", p, float(tolerance))


def block_counts(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, m: int, fused: bool = False
                 ) -> tuple[Var, Var | None]:
    """Nonzeros per block of `m` consecutive entries along axis 1 of a weight viewed `[o, c, k]` (int32, one
    entry per block: `c // m` blocks per row and kernel position), and the indicator's tail entries
    `[o, c % m, k]` (None when `m` divides `c`). `fused` (torch.compile): the m entries of a block added in
    one expression that inductor fuses with its consumers."""
    op = b.emit
    o, c, k = shape[0], shape[1], math.prod(shape[2:])
    nb = c // m
    e = indicator(b, p, tolerance, fused)
    if fused:
        e3 = op("reshape", e, (o, c, k))
        tail = op("narrow", e3, 1, nb * m, c - nb * m) if nb * m != c else None
        x = op("reshape", op("narrow", e3, 1, 0, nb * m) if tail is not None else e3, (o, nb, m, k))
        if m <= 8:
            return functools.reduce(b.add, [op("narrow", x, 2, j, 1) for j in range(m)]), tail
        return op("isum", x, (2,), "int32"), tail
    if k == 1 and m == 4 and nb * m == c:
        return op("block4_count", op("reshape", e, (o, c))), None
    if nb * m == c:
        tail, x = None, op("reshape", e, (o, nb, m, k))
    else:
        e3 = op("reshape", e, (o, c, k))
        tail = op("narrow", e3, 1, nb * m, c - nb * m)
        x = op("reshape", op("narrow", e3, 1, 0, nb * m), (o, nb, m, k))
    # byte adds (a sum of m <= 255 ones cannot overflow a byte): pairwise half blocks for powers of two
    # (fewer, wider ops), one add per entry for short blocks; other blocks are summed in int32
    if m <= 255 and m & (m - 1) == 0:
        width = m
        while width > 1:
            width //= 2
            x = op("add", op("narrow", x, 2, 0, width), op("narrow", x, 2, width, width))
        # one conversion of the [o, nb, 1, k] counts: the sums and products below then need no cast
        return op("to_int32", x), tail
    if m <= 8:
        first = op("narrow", x, 2, 0, 1)
        x = functools.reduce(lambda a, j: op("add", a, op("narrow", x, 2, j, 1)), range(1, m), first)
        return op("to_int32", x), tail
    return op("isum", x, (2,), "int32"), tail


def sum_dtype(bound: int) -> str:
    """int32 when the sum cannot reach 2**31 (no cast: torch copies the whole input to the requested dtype
    before reducing when they differ), else int64."""
    return "int32" if bound < 2**31 else "int64"


def total_count(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, fused: bool = False) -> Var:
    """Number of elements with |w| > tolerance, an integer scalar. For weights with 4+ entries along axis 1
    it is the sum of the 4-blocks of `block_counts` (shared with 2:4 sparsity) plus the tail."""
    n = math.prod(shape)
    if len(shape) < 2 or shape[1] < 4:
        return b.emit("isum", indicator(b, p, tolerance, fused), None, "int64")
    blocks, tail = block_counts(b, p, shape, tolerance, 4, fused)
    total = b.emit("isum", blocks, None, sum_dtype(n))
    return total if tail is None else b.add(total, b.emit("isum", tail, None, "int64"))


def row_any(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """1 for every index of axis 0 with a nonzero entry, else 0 (uint8 `[o]`): a byte max, which torch
    vectorizes (a byte sum would first copy the indicator to a wider integer type)."""
    return b.emit("amax", b.emit("reshape", indicator(b, p, tolerance), (shape[0], -1)), (1,))


def col_any(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """1 for every index of axis 1 with a nonzero entry (over every other axis), else 0 (uint8 `[c]`)."""
    o, c, k = shape[0], shape[1], math.prod(shape[2:])
    cols = b.emit("amax", b.emit("reshape", indicator(b, p, tolerance), (o, c * k)), (0,))
    return cols if k == 1 else b.emit("amax", b.emit("reshape", cols, (c, k)), (1,))
