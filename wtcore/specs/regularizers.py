"""Differentiable regularizers to add to the training loss."""

from __future__ import annotations

from ..compiler import Context
from ..errors import SpecError
from ..lang import Var
from ..spec import define_spec


@define_spec("group_lasso", deps=("unit_l2",))
def group_lasso(ctx: Context, weighted: bool = True, groups: str = "prunable") -> Var:
    """Group lasso: sum over units of sqrt(params per unit) * ||unit||_2 (`weighted=False`: plain sum of norms).

    `groups="prunable"` (default) leaves out units that are never pruned (e.g. a classifier's logits);
    `groups="all"` regularizes every unit. The gradient is finite (0) at units that are exactly zero.
    """
    if groups not in ("prunable", "all"):
        raise SpecError(f"group_lasso: groups must be 'prunable' or 'all', got {groups!r}")
    b = ctx.b
    norms = ctx.dep("unit_l2")
    if weighted:
        norms = b.mul(norms, b.cast_like(b.sqrt(ctx.params_per_unit()), norms))
    if groups == "prunable":
        norms = b.where(ctx.prunable_units(), norms, 0.0)
    return b.sum(norms)
