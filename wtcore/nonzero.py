"""The packed nonzero indicator: one byte per weight element, shared by every count a program makes.

Unit activity (the compiler's `nnz` unit reduction), zero counts (unstructured sparsity and BOPs) and N:M
block counts all start from the same `nonzero_bytes(w, tolerance)` value, emitted through the hash-consing
builder, so a weight is read once for all of them and the large intermediate is a byte per element (a
float indicator is four, and `sign(|w|)` took two full-size float passes). Everything downstream is an
exact integer reduction: block counts (`block4_count` for the contiguous blocks of linear and 1x1-conv
weights, byte adds otherwise), row counts (from the block counts when some spec made them), column counts
(one byte reduction over the leading dim).

Compiled programs (`backend=`, `fused=True`) count differently, because inductor's CPU code has its own
costs (measured with torch 2.14.1; see `wtcore.lang` for the operators): the indicator comes from an opaque
operator running ATen's cast (inductor stores bool/uint8 ~20x slower), together with the column activity
(ATen's byte amax: inductor's outer reductions were 2-5x slower); linear and 1x1-conv weights with 4 | inputs
get it as int32 words (4 inputs a word, read with full-width vector loads); every other count is a row
reduction, and the 2:4 block counts, the row nonzeros and the strict/eligible blocks are ONE packed int64
row sum per weight (`packed_rows`). ResNet-50's all-metrics program went from 4.0x to 1.4x the floor (one
thread, CPU time; eager: 1.9x).

The functions emit identical equations whoever calls them (compiler or spec), which is what makes the
sharing work: change them in one place only.
"""

from __future__ import annotations

import functools
import math

from .lang import Builder, Var

__all__ = [
    "FIELD", "block_counts", "col_any", "indicator", "packed_field", "packed_rows", "packs_rows", "per_row",
    "row_any", "row_counts", "sum_dtype", "total_count", "words",
]


def indicator(b: Builder, p: Var, tolerance: float, fused: bool = False) -> Var:
    """1 where |w| > tolerance, uint8, shape of the parameter. `fused` (compiled programs, 2+-dim weights):
    the first output of `nonzero_bytes_cols`, whose second is the column activity (`col_any`)."""
    if fused:
        return b.emit("item", b.emit("nonzero_bytes_cols", p, float(tolerance)), 0)
    return b.emit("nonzero_bytes", p, float(tolerance))


def _words_layout(shape: tuple[int, ...]) -> bool:
    """Compiled programs read a weight's indicator as int32 words (4 consecutive input entries per word) when
    its N:M blocks are contiguous: linear and 1x1-conv weights with a multiple of 4 inputs."""
    return len(shape) >= 2 and math.prod(shape[2:]) == 1 and shape[1] >= 4 and shape[1] % 4 == 0


def words(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """`nonzero_words` of a `_words_layout` weight (compiled programs): (int32 words `[o, c // 4]`, uint8
    column activity `[c]`)."""
    return b.emit("nonzero_words", b.emit("reshape", p, (shape[0], shape[1])), float(tolerance))


def block_counts(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, m: int, fused: bool = False
                 ) -> tuple[Var, Var | None]:
    """Nonzeros per block of `m` consecutive entries along axis 1 of a weight viewed `[o, c, k]` (int32, one
    entry per block: `c // m` blocks per row and kernel position), and the indicator's tail entries
    `[o, c % m, k]` (None when `m` divides `c`).

    `fused` (torch.compile; first entry of the result has `o` rows, reduce it with `per_row`): 2:4 blocks of
    contiguous inputs are word counts of `words` (measured on vit_b_16's 2-D weights: sums from words 6.5 ms,
    from bytes 17.4 ms); other blocks add their m entries in int32 in one expression inductor fuses with its
    consumers (a uint8 add makes it store bytes, ~20x slower than ATen)."""
    op = b.emit
    o, c, k = shape[0], shape[1], math.prod(shape[2:])
    nb = c // m
    if fused and m == 4 and _words_layout(shape):
        return op("word_count", op("item", words(b, p, shape, tolerance), 0)), None
    e = indicator(b, p, tolerance, fused)
    if fused:
        e3 = op("to_int32", op("reshape", e, (o, c, k)))
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


def per_row(b: Builder, x: Var, shape: tuple[int, ...]) -> Var:
    """int32 sums over every axis but the first of a value with one entry per row, block (or input) and
    kernel position of a weight of `shape` (compiled programs). Every per-weight count of a compiled program
    is a row reduction like this one, then a sum of the row values: inductor computes the row sums of one
    weight in ONE loop nest. The value is viewed `[o, -1, k]`: with the kernel positions a loop of their own
    inductor vectorizes the loads (flattened, the block index needs a division per element and its loop
    stays scalar)."""
    return b.emit("isum", b.emit("reshape", x, (shape[0], -1, math.prod(shape[2:]))), (1, 2), "int32")


#: bits per field of `packed_rows`: a row's nonzeros, and its 4-blocks with exactly / at most `keep` nonzeros
FIELD = 21


def packs_rows(shape: tuple[int, ...]) -> bool:
    """Whether `packed_rows` applies: 4+ inputs, and a row's counts fit a field."""
    return len(shape) >= 2 and shape[1] >= 4 and math.prod(shape[1:]) < 2**FIELD


def packed_rows(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, keep: int = 2) -> Var:
    """Per row of a `packs_rows` weight (compiled programs), three counts over its 4-blocks packed in one
    int64 (`FIELD` bits each, low to high): nonzeros, blocks with exactly `keep` nonzeros, blocks with at
    most `keep`; read them with `bitfield`. ONE reduction: inductor gave the three sums three loops over the
    same words when a kernel held many weights (its fusion size limit), so each weight's words were read 3x.
    `keep = 2` (2:4) is the one the zero counts and row activity use, so the tracker's metrics share it."""
    cnt, _ = block_counts(b, p, shape, tolerance, 4, True)
    op = b.emit
    packed = b.add(b.add(op("to_long", cnt), b.mul(op("to_long", b.eq(cnt, keep)), 2**FIELD)),
                   b.mul(op("to_long", op("le", cnt, keep)), 2 ** (2 * FIELD)))
    return op("isum", op("reshape", packed, (shape[0], -1, math.prod(shape[2:]))), (1, 2), "int64")


def packed_field(b: Builder, rows: Var, i: int) -> Var:
    """Field `i` of `packed_rows` (0: nonzeros, 1: blocks with exactly `keep`, 2: with at most `keep`)."""
    return b.emit("bitfield", rows, i * FIELD, 2**FIELD - 1)


def row_counts(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """Nonzeros per index of axis 0 of a 2+-dim weight (integer `[o]`, compiled programs): from the 2:4 block
    counts (shared with N:M, `packed_rows`) and the tail when axis 1 has 4+ entries."""
    if shape[1] < 4:
        return per_row(b, b.emit("to_int32", indicator(b, p, tolerance, True)), shape)
    blocks, tail = block_counts(b, p, shape, tolerance, 4, True)
    if packs_rows(shape):
        rows = packed_field(b, packed_rows(b, p, shape, tolerance), 0)
    else:
        rows = per_row(b, blocks, shape)
    return rows if tail is None else b.add(rows, per_row(b, tail, shape))


def sum_dtype(bound: int) -> str:
    """int32 when the sum cannot reach 2**31 (no cast: torch copies the whole input to the requested dtype
    before reducing when they differ), else int64."""
    return "int32" if bound < 2**31 else "int64"


def total_count(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, fused: bool = False) -> Var:
    """Number of elements with |w| > tolerance, an integer scalar. For weights with 4+ entries along axis 1
    it is the sum of the 4-blocks of `block_counts` (shared with 2:4 sparsity) plus the tail; compiled
    (`fused`), the sum of `row_counts` (shared with row activity)."""
    n = math.prod(shape)
    if len(shape) < 2:
        return b.emit("isum", indicator(b, p, tolerance), None, "int64")
    if fused:
        return b.emit("isum", row_counts(b, p, shape, tolerance), None, "int64")
    if shape[1] < 4:
        return b.emit("isum", indicator(b, p, tolerance), None, "int64")
    blocks, tail = block_counts(b, p, shape, tolerance, 4)
    total = b.emit("isum", blocks, None, sum_dtype(n))
    return total if tail is None else b.add(total, b.emit("isum", tail, None, "int64"))


def row_any(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, fused: bool = False) -> Var:
    """1 for every index of axis 0 with a nonzero entry, else 0 (uint8 `[o]`): a byte max, which torch
    vectorizes (a byte sum would first copy the indicator to a wider integer type). Compiled (`fused`,
    bool): `row_counts > 0`, from the row counts the zero counts share (inductor's byte row max is slow:
    19 ms on vit_b_16's 2-D weights, against 6.6 ms for the column max)."""
    if fused:
        return b.gt(row_counts(b, p, shape, tolerance), 0)
    return b.emit("amax", b.emit("reshape", indicator(b, p, tolerance), (shape[0], -1)), (1,))


def col_any(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, fused: bool = False) -> Var:
    """1 for every index of axis 1 with a nonzero entry (over every other axis), else 0 (uint8 `[c]`).
    Compiled (`fused`): the second output of the opaque op that makes the indicator (see `wtcore.lang`)."""
    if fused:
        src = words(b, p, shape, tolerance) if _words_layout(shape) else b.emit("nonzero_bytes_cols", p,
                                                                                float(tolerance))
        return b.emit("item", src, 1)
    o, c, k = shape[0], shape[1], math.prod(shape[2:])
    cols = b.emit("amax", b.emit("reshape", indicator(b, p, tolerance), (o, c * k)), (0,))
    return cols if k == 1 else b.emit("amax", b.emit("reshape", cols, (c, k)), (1,))
