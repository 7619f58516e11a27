"""Nonzero counts of weights: every count a program makes of a 2+-dim weight comes from ONE value.

Unit activity (the `active` unit reduction), zero counts (unstructured sparsity and BOPs) and N:M block
counts all read `stats(w)`: the `nonzero_stats` primitive, per output row the nonzeros and the m-blocks
along axis 1 with exactly / at most `keep` nonzeros, and per input the activity. The compiler batches
every weight's `nonzero_stats` into one call (`wtcore.passes.batch_nonzero_stats`), run by a native kernel
that reads each element once (`wtcore.native`; torch ops where it cannot run). 1-D parameters (biases,
norms) are counted from a byte indicator (`indicator`).

The functions emit identical equations whoever calls them (the lowering or a spec), which is what makes
the sharing work: change them in one place only.
"""

from __future__ import annotations

from .lang import Builder, Var

__all__ = ["col_any", "indicator", "row_any", "row_counts", "stats", "stats_blocks", "total_count"]


def indicator(b: Builder, p: Var, tolerance: float) -> Var:
    """1 where |w| > tolerance, uint8, shape of the parameter."""
    return b.emit("nonzero_bytes", p, tolerance=float(tolerance))


def stats(b: Builder, p: Var, tolerance: float, m: int = 4, keep: int = 2) -> Var:
    """`nonzero_stats` of a 2+-dim weight: a pair (int64 `[3, o]`: per row the nonzeros, the `m`-blocks along
    axis 1 with exactly `keep` and with at most `keep` nonzeros; uint8 `[c]`: 1 where an input has a
    nonzero). m = 4, keep = 2 (2:4) is the one zero counts and activity use, so a program tracking 2:4
    sparsity reads its weights once."""
    return b.emit("nonzero_stats", p, tolerance=float(tolerance), m=int(m), keep=int(keep))


def _stats_row(b: Builder, st: Var, i: int) -> Var:
    return b.emit("select", b.emit("item", st, index=0), dim=0, index=i)


def stats_blocks(b: Builder, p: Var, tolerance: float, m: int, keep: int) -> tuple[Var, Var]:
    """(blocks with exactly `keep` nonzeros, blocks with at most `keep`) of a weight, int64 scalars."""
    st = stats(b, p, tolerance, m, keep)
    return (b.emit("sum", _stats_row(b, st, 1), dtype="int64"), b.emit("sum", _stats_row(b, st, 2), dtype="int64"))


def row_counts(b: Builder, p: Var, tolerance: float) -> Var:
    """Nonzeros per index of axis 0 of a 2+-dim weight (int64 `[o]`)."""
    return _stats_row(b, stats(b, p, tolerance), 0)


def total_count(b: Builder, p: Var, ndim: int, tolerance: float) -> Var:
    """Number of elements with |w| > tolerance of a parameter with `ndim` dims, an int64 scalar."""
    if ndim < 2:
        return b.emit("sum", indicator(b, p, tolerance), dtype="int64")
    return b.emit("sum", row_counts(b, p, tolerance), dtype="int64")


def row_any(b: Builder, p: Var, tolerance: float) -> Var:
    """True for every index of axis 0 of a 2+-dim weight with a nonzero entry (bool `[o]`)."""
    return b.gt(row_counts(b, p, tolerance), 0)


def col_any(b: Builder, p: Var, tolerance: float) -> Var:
    """1 for every index of axis 1 of a 2+-dim weight with a nonzero entry (over every other axis), else 0
    (uint8 `[c]`)."""
    return b.emit("item", stats(b, p, tolerance), index=1)
