"""Fused projections whose output Torch-Pruning cannot split: their output axis as a group that is not prunable.

`graph.fused_linears` finds Linear layers whose output is split or sliced into parts (Phi-3's `gate_up_proj`
and `qkv_proj`); they root no Torch-Pruning group, so their rows would be in no group at all. Attention
discovery covers fused q/k/v projections it understands; every other fused layer gets one group over its
output axis here, not prunable, with the reason — so no weight axis is left out silently and no mask cuts it.
A fused gate/up projection (`chunk(2)` into gate and up, then `down_proj`) gets one unit per MLP feature: row
`i` of the gate part, row `i` of the up part and column `i` of the down projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from wtcore.ir import Slice, Structure, UnitGroup, runs_from_list

__all__ = ["FUSED_REASON", "add_fused_groups"]

FUSED_REASON = (
    "fused projection {name!r}: its output is split into parts ({parts}) and a unit is one feature of "
    "each part, which Torch-Pruning cannot cut; wt keeps it whole"
)


def _param(structure: Structure, module: str, leaf: str) -> str | None:
    want = f"{module}.{leaf}" if module else leaf
    for p in structure.params:
        if p.name == want or want in p.aliases:
            return p.name
    return None


def add_fused_groups(structure: Structure, model: nn.Module, fused: Sequence[nn.Module]) -> Structure:
    """`structure` plus a not-prunable group over the output axis of every fused layer no group covers."""
    names = {id(m): n for n, m in model.named_modules()}
    covered = {(s.param, s.axis) for g in structure.groups for s in g.slices}
    parents = dict(model.named_modules())
    groups = list(structure.groups)
    order = {id(m): i for i, m in enumerate(model.modules())}
    for m in sorted(fused, key=lambda m: order.get(id(m), len(order))):
        name = names.get(id(m))
        w = _param(structure, name, "weight") if name is not None else None
        if not isinstance(m, nn.Linear) or w is None or (w, 0) in covered:
            continue
        b = _param(structure, name, "bias")
        rows = m.out_features
        parent_name, _, leaf = name.rpartition(".")
        down = getattr(parents.get(parent_name), "down_proj", None)
        if "gate_up" in leaf and rows % 2 == 0 and isinstance(down, nn.Linear) and down.in_features == rows // 2:
            size, parts = rows // 2, "gate and up"
            idx = runs_from_list([*range(size), *range(size)])
            slices = [Slice(w, 0, idx)] + ([Slice(b, 0, idx)] if b else [])
            d = _param(structure, f"{parent_name}.down_proj" if parent_name else "down_proj", "weight")
            if d is not None and (d, 1) not in covered:
                slices.append(Slice(d, 1, runs_from_list(list(range(size)))))
            kind = "mlp_feature"
        else:
            size, parts, kind = rows, "parts", "feature"
            idx = runs_from_list(list(range(rows)))
            slices = [Slice(w, 0, idx)] + ([Slice(b, 0, idx)] if b else [])
        groups.append(
            UnitGroup(
                f"{name}.out",
                kind,
                size,
                tuple(slices),
                prunable=False,
                root=name,
                reason=FUSED_REASON.format(name=name, parts=parts),
            )
        )
        covered |= {(s.param, s.axis) for s in slices}
    if len(groups) == len(structure.groups):
        return structure
    touched = {s.param for g in groups for s in g.slices}
    return Structure(
        structure.params,
        tuple(groups),
        structure.ops,
        structure.model,
        tuple(p for p in structure.uncoupled if p not in touched),
    )
