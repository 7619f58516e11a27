"""Nonzero counts of weights: every count a program makes of a 2+-dim weight comes from ONE value.

Unit activity (the compiler's `active` unit reduction), zero counts (unstructured sparsity and BOPs) and
N:M block counts all read `stats(w)`: the `nonzero_stats` primitive, per output row the nonzeros and the
m-blocks along axis 1 with exactly / at most `keep` nonzeros, and per input the activity. The compiler
batches every weight's `nonzero_stats` into one call (`_batch_stats`), run by a C kernel that reads each
element once and keeps one row's indicator in L1 (`wtcore.native`; torch ops where it cannot run, under
`vmap`/`grad` and off the CPU). Composed from torch ops, the same counts cost a full-size indicator per
weight in eager (ATen), and inductor's CPU code for them is slower still (bool/uint8 stores ~20x slower
than ATen's, column reductions 2-5x): ResNet-50's all-metrics program spent ~9 ms of its ~17 ms compiled,
and ~14 ms of ~20 ms eager, there; the kernel takes ~4 ms.

1-D parameters (biases, norms) are counted from a byte indicator (`indicator`). The functions emit
identical equations whoever calls them (compiler or spec), which is what makes the sharing work: change
them in one place only.
"""

from __future__ import annotations

from .lang import Builder, Var

__all__ = ["col_any", "indicator", "row_any", "row_counts", "stats", "stats_blocks", "total_count"]


def indicator(b: Builder, p: Var, tolerance: float) -> Var:
    """1 where |w| > tolerance, uint8, shape of the parameter."""
    return b.emit("nonzero_bytes", p, float(tolerance))


def stats(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, m: int = 4, keep: int = 2) -> Var:
    """`nonzero_stats` of a 2+-dim weight: a pair (int64 `[3, o]`: per row the nonzeros, the `m`-blocks along
    axis 1 with exactly `keep` and with at most `keep` nonzeros; uint8 `[c]`: 1 where an input has a
    nonzero). m = 4, keep = 2 (2:4) is the one zero counts and activity use, so a program tracking 2:4
    sparsity reads its weights once."""
    return b.emit("nonzero_stats", p, float(tolerance), int(m), int(keep), shape[0], shape[1])


def _stats_row(b: Builder, st: Var, i: int) -> Var:
    return b.emit("item", b.emit("item", st, 0), i)


def stats_blocks(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float, m: int, keep: int
                 ) -> tuple[Var, Var]:
    """(blocks with exactly `keep` nonzeros, blocks with at most `keep`) of a weight, int64 scalars."""
    st = stats(b, p, shape, tolerance, m, keep)
    return (b.emit("isum", _stats_row(b, st, 1), None, "int64"), b.emit("isum", _stats_row(b, st, 2), None, "int64"))


def row_counts(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """Nonzeros per index of axis 0 of a 2+-dim weight (int64 `[o]`)."""
    return _stats_row(b, stats(b, p, shape, tolerance), 0)


def total_count(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """Number of elements with |w| > tolerance, an int64 scalar."""
    if len(shape) < 2:
        return b.emit("isum", indicator(b, p, tolerance), None, "int64")
    return b.emit("isum", row_counts(b, p, shape, tolerance), None, "int64")


def row_any(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """True for every index of axis 0 of a 2+-dim weight with a nonzero entry (bool `[o]`)."""
    return b.gt(row_counts(b, p, shape, tolerance), 0)


def col_any(b: Builder, p: Var, shape: tuple[int, ...], tolerance: float) -> Var:
    """1 for every index of axis 1 of a 2+-dim weight with a nonzero entry (over every other axis), else 0
    (uint8 `[c]`)."""
    return b.emit("item", stats(b, p, shape, tolerance), 1)
