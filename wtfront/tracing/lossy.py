"""Groups whose units a normalization mixes: removing such a unit is not the same function as zeroing it.

A LayerNorm, GroupNorm or RMSNorm over a group's units divides by statistics over all of them, so a zeroed
unit still counts in the mean and variance while a removed one does not; `nn.MultiheadAttention` derives its
scaling from its embedding dimension. `trace` records the reason in `UnitGroup.lossy`; mask specs then leave
these groups alone (unless `lossy=True`), as physical pruning refuses them unless `strict=False`, so a mask
never zeroes what physical pruning cannot remove with the same output.
"""

from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from wtcore.ir import Structure, UnitGroup

from ..modules import slice_modules
from .units import HEAD_KINDS

__all__ = ["group_lossy_reason", "mark_lossy", "normalized_reason"]


def normalized_reason(module: nn.Module, name: str, param: str | None = None) -> str | None:
    """Why a unit axis through `module` (parameter `param` of it; None: the module as a whole) is mixed by a
    normalization, or None."""
    if isinstance(module, nn.LayerNorm):
        return (
            f"{type(module).__name__} {name!r} normalizes over its units (zeroing a unit changes the mean and "
            "variance of the others; removing it does not)"
        )
    if isinstance(module, nn.GroupNorm):
        return f"GroupNorm {name!r} normalizes over groups of its units"
    if isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm"):  # LlamaRMSNorm, ...
        return (
            f"{type(module).__name__} {name!r} normalizes over its units (zeroing a unit changes the root mean "
            "square of the others; removing it does not)"
        )
    if isinstance(module, nn.MultiheadAttention) and (param is None or param.endswith("in_proj_weight")):
        return f"MultiheadAttention {name!r}: its scaling follows head_dim, which pruning its embedding width changes"
    return None


def group_lossy_reason(model: nn.Module, structure: Structure, g: UnitGroup) -> str:
    """Why removing units of `g` is not the same function as zeroing them, read from its slices ("" if it is)."""
    if g.kind in HEAD_KINDS:
        return ""
    for s, mname, m in slice_modules(model, structure, g):
        if isinstance(m, nn.MultiheadAttention) and s.axis != 1:
            continue  # in-projection rows are heads, not the embedding dimension
        why = normalized_reason(m, mname, s.param)
        if why:
            return why
    return ""


def mark_lossy(structure: Structure, model: nn.Module) -> Structure:
    """`structure` with `UnitGroup.lossy` set on every group whose units a normalization mixes."""
    groups = tuple(replace(g, lossy=group_lossy_reason(model, structure, g)) for g in structure.groups)
    return replace(structure, groups=groups)
