"""Fused projections whose output Torch-Pruning cannot split: their output axis as a group that is not prunable.

`graph.fused_linears` finds Linear layers whose output is split or sliced into parts (Phi-3's `gate_up_proj`
and `qkv_proj`); they root no Torch-Pruning group, so their rows would be in no group at all. Attention
discovery covers fused q/k/v projections it understands; every other fused layer gets one group over its
output axis here, not prunable, with the reason — so no weight axis is left out silently and no mask cuts it.
A fused gate/up projection (`chunk(2)` into gate and up, then a down projection: Phi-3's `gate_up_proj`, timm's
`GluMlp`) gets one unit per MLP feature: row `i` of the gate part, row `i` of the up part and column `i` of the
down projection; with an activation beside it (a gated MLP) that group is prunable, and physical pruning cuts
it from the IR (`is_gate_up_group`), since Torch-Pruning ignores fused layers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch.nn as nn

from wtcore.ir import Slice, Structure, UnitGroup, runs_from_list, runs_to_list

__all__ = ["FUSED_REASON", "add_fused_groups", "is_gate_up_group"]

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


def _has_activation(parent: nn.Module) -> bool:
    """Whether `parent` has an activation child (torch's or Hugging Face's activation modules): the gate of a
    gated MLP, which a fused k/v projection beside an output projection does not have."""
    return any(
        type(c).__module__ in ("torch.nn.modules.activation", "transformers.activations") for c in parent.children()
    )


def is_gate_up_group(g: UnitGroup, structure: Structure) -> bool:
    """Whether `g` is a gated MLP's features over a fused gate/up layer (unit `i` = row `i` of each half, as
    `add_fused_groups` builds it): Torch-Pruning ignores fused layers, so physical pruning cuts it from the IR."""
    if g.kind != "mlp_feature":
        return False
    for s in g.slices:
        p = structure.param_map[s.param]
        if s.axis == 0 and p.module_type == "Linear" and len(p.shape) == 2 and p.shape[0] == 2 * g.size:
            return runs_to_list(s.index) == [*range(g.size), *range(g.size)]
    return False


def _glu_down(parent: nn.Module | None, fused: nn.Linear) -> str | None:
    """The down projection of a gated MLP whose fused layer `fused` holds the gate and up rows (Phi-3's
    `gate_up_proj`/`down_proj`, timm's `GluMlp` `fc1`/`fc2`): the parent's only other Linear, reading half of
    `fused`'s rows. Found from the shapes, so a unit is row `i` of each half and column `i` of the down
    projection (and entry `i` of a `norm` over the features in between)."""
    if parent is None or fused.out_features % 2:
        return None
    others = [(n, c) for n, c in parent.named_children() if isinstance(c, nn.Linear) and c is not fused]
    if len(others) != 1 or others[0][1].in_features != fused.out_features // 2:
        return None
    return others[0][0]


def add_fused_groups(
    structure: Structure, model: nn.Module, fused: Sequence[nn.Module], units: Collection[str] = ("mlp_feature",)
) -> Structure:
    """`structure` plus a group over the output axis of every fused layer no group covers: not prunable, with
    the reason, except a gated MLP's features (with an activation beside them, `mlp_feature` selected), which
    physical pruning cuts from the IR."""
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
        parent_name = name.rpartition(".")[0]
        parent = parents.get(parent_name)
        down = _glu_down(parent, m)
        reason = ""
        if down is not None:
            size, parts = rows // 2, "gate and up"
            idx = runs_from_list([*range(size), *range(size)])
            slices = [Slice(w, 0, idx)] + ([Slice(b, 0, idx)] if b else [])
            prefix = f"{parent_name}." if parent_name else ""
            for child, leaf, axis in ((down, "weight", 1), *(("norm", t, 0) for t in ("weight", "bias"))):
                d = _param(structure, f"{prefix}{child}", leaf)
                if d is not None and (d, axis) not in covered and structure.param_map[d].shape[axis] == size:
                    slices.append(Slice(d, axis, runs_from_list(list(range(size)))))
            kind = "mlp_feature"
            if not _has_activation(parent):
                reason = FUSED_REASON.format(name=name, parts=parts)
            elif "mlp_feature" not in units:
                reason = (
                    "unit kind 'mlp_feature' is not selected; pass units=(..., 'mlp_feature') to trace() to prune it"
                )
        else:
            size, parts, kind = rows, "parts", "feature"
            idx = runs_from_list(list(range(rows)))
            slices = [Slice(w, 0, idx)] + ([Slice(b, 0, idx)] if b else [])
            reason = FUSED_REASON.format(name=name, parts=parts)
        groups.append(
            UnitGroup(f"{name}.out", kind, size, tuple(slices), prunable=not reason, root=name, reason=reason)
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
