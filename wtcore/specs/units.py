"""Which units are alive, and how big they are."""

from __future__ import annotations

from ..errors import SpecError
from ..lang import Var
from ..spec import Context, define_spec


@define_spec("params_per_unit")
def params_per_unit(ctx: Context) -> Var:
    """Number of distinct parameter elements coupled to each unit (a constant folded at compile time)."""
    return ctx.b.to_long(ctx.params_per_unit())


@define_spec("unit_active")
def unit_active(ctx: Context, tolerance: float = 0.0) -> Var:
    """True unless every coupled element of the unit has |w| <= tolerance.

    A unit with no coupled element left after include/ignore filters counts as active: nothing says it is pruned.
    """
    if not tolerance >= 0.0:
        raise SpecError(f"unit_active: tolerance must be >= 0, got {tolerance!r}")
    b = ctx.b
    nonzero = b.gt(b.unit_reduce("active", float(tolerance)), 0)
    return b.logical_or(nonzero, b.eq(ctx.params_per_unit(), 0))


@define_spec("group_active_units", deps=("unit_active",), outputs="group")
def group_active_units(ctx: Context, tolerance: float = 0.0) -> Var:
    """Active units per group, `[num_groups]` int64, in `structure.groups` order."""
    b = ctx.b
    active = b.segment_sum_sorted(b.to_long(ctx.dep("unit_active", tolerance=tolerance)), ctx.group_ends())
    return ctx.name_items(active, [g.name for g in ctx.structure.groups])
