"""Per-unit norms: the sum of squares over every coupled slice feeds norms, activity, lasso and BOPs."""

from __future__ import annotations

from ..lang import Var
from ..spec import Context, define_spec


@define_spec("unit_sumsq")
def unit_sumsq(ctx: Context) -> Var:
    """Sum of squares of every parameter element coupled to each unit, `[num_units]` (fp32 accumulation)."""
    return ctx.b.unit_reduce("sumsq")


@define_spec("unit_l2", deps=("unit_sumsq",))
def unit_l2(ctx: Context) -> Var:
    """L2 norm of each unit over all its coupled slices; gradient 0 (not NaN) at exactly-zero units."""
    return ctx.b.safe_sqrt(ctx.dep("unit_sumsq"))


@define_spec("unit_l1")
def unit_l1(ctx: Context) -> Var:
    """Sum of absolute values of every parameter element coupled to each unit."""
    return ctx.b.unit_reduce("abssum")
