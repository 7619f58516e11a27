"""Heads, grouped-query KV heads, head dimensions and MLP features as the IR's units.

After Torch-Pruning's groups are lowered, `apply_attention_units` replaces every group slice of a discovered
attention module's head axes (`wtfront.tracing.attention`) by one head-level group per module:

- `head`: one unit per query head, with its q/k/v rows and output-projection input columns (multi-head
  attention). Under grouped-query attention (`num_kv_heads < num_heads`) a `head` unit is a query-head
  *slot* `r` in `0..n_rep-1`: query head `r` of every KV group (q rows and output columns only), so removing
  it keeps the same number of query heads per KV head everywhere.
- `kv_head` (the default under grouped-query attention): one unit per KV head, with its k/v rows and the
  q rows / output columns of the `n_rep` query heads that share it.
- `head_dim` (instead of heads, `units=("head_dim", ...)`): one unit per head dimension `d`, coupling q/k row
  `d` of every head (the q.k dimension), v row `d` of every head and the output projection's input column `d`
  of every head. It excludes `head`/`kv_head` (an entry would sit in two groups, and a projection's cost axis
  cannot follow both). Removing dims keeps each module's attention scale at its original value (timm `scale`,
  HF `scaling`), so outputs are unchanged; rotary attention (entry `d` paired with `d + head_dim/2`) and
  `nn.MultiheadAttention` (its forward derives the scale from `head_dim`) are refused / not prunable.
- `mlp_feature`: the other Linear feature groups of a model with attention (MLP hidden features).
- `hidden`: the residual width (the group of the attention's input columns), coupled across all blocks.

Kinds that are not selected (`trace(units=...)`) stay in the IR but are not prunable, with a reason
saying how to select them. Head groups are pruned physically by surgery from the IR
(`wtfront.prune.surgery`), not by Torch-Pruning, and module metadata (`num_heads`, ...) is synced by the
hooks of `wtfront.prune.metadata`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch.nn as nn

from wtcore.errors import TraceError
from wtcore.ir import AxisPart, CostAxis, Slice, Structure, UnitGroup, runs_from_list

from .attention import AttentionLayout, HeadOverride, discover_attention
from .inputs import called_modules

__all__ = [
    "ALL_UNIT_KINDS",
    "DEFAULT_UNITS",
    "HEAD_KINDS",
    "HIDDEN_REASON",
    "apply_attention_costs",
    "apply_attention_units",
]

#: Unit kinds that `trace(units=...)` can select.
ALL_UNIT_KINDS = ("head", "kv_head", "head_dim", "mlp_feature", "hidden")
#: Default: attention heads (KV heads under grouped-query attention) and MLP features; the residual width
#: stays in the IR but is not prunable.
DEFAULT_UNITS = ("head", "kv_head", "mlp_feature")
#: Group kinds pruned physically by surgery from the IR instead of Torch-Pruning.
HEAD_KINDS = frozenset({"head", "kv_head", "head_dim"})


def _check_units(units: Iterable[str]) -> tuple[str, ...]:
    units = tuple(units)
    bad = [u for u in units if u not in ALL_UNIT_KINDS]
    if bad:
        raise TraceError(f"units={units!r}: unknown unit kind(s) {bad}; choose from {ALL_UNIT_KINDS}")
    if "head_dim" in units and HEAD_KINDS.intersection(units) - {"head_dim"}:
        raise TraceError(
            f"units={units!r}: 'head_dim' excludes 'head' and 'kv_head' (a q/k/v row would belong to a head unit and "
            "a head-dim unit, and a projection's cost axis cannot follow both); trace with units=('head_dim', "
            "'mlp_feature') to prune head dimensions, or without 'head_dim' to prune heads"
        )
    return units


HIDDEN_REASON = (
    "the residual (hidden) width, coupled across all blocks; pass units=(..., 'hidden') to trace() to prune it "
    "(a LayerNorm or RMSNorm over it makes removal lossy: prune_units(..., strict=False))"
)


def _not_selected(kind: str) -> str:
    return f"unit kind {kind!r} is not selected; pass units=(..., {kind!r}) to trace() to prune it"


def _head_group(lay: AttentionLayout, kind: str, structure: Structure, units: Collection[str]) -> UnitGroup:
    by_key: dict[tuple[str, int], np.ndarray] = {}
    for s in lay.segments:
        length = structure.param_map[s.param].shape[s.axis]
        idx = by_key.setdefault((s.param, s.axis), np.full(length, -1, dtype=np.int64))
        count = lay.num_kv_heads if s.role in ("k", "v") else lay.num_heads
        if s.width:  # a per-head table (one or more positions per head, not per head dim)
            if kind != "head_dim":
                for h in range(count):
                    idx[s.offset + h * s.width: s.offset + (h + 1) * s.width] = lay.unit_of_head(kind, s.role, h)
            continue
        for h in range(count):
            a = s.offset + h * (s.stride or lay.head_dim)
            if kind == "head_dim":
                idx[a: a + lay.head_dim] = np.arange(lay.head_dim)
            else:
                idx[a: a + lay.head_dim] = lay.unit_of_head(kind, s.role, h)
    order = {p.name: i for i, p in enumerate(structure.params)}
    slices = tuple(Slice(p, axis, runs_from_list(idx)) for (p, axis), idx in
                   sorted(by_key.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])) if (idx >= 0).any())
    active = kind in units or (kind == "head" and lay.num_kv_heads == lay.num_heads and "kv_head" in units)
    reason = lay.blocked or ("" if active else _not_selected(kind))
    if kind == "head_dim" and lay.family == "torch_mha" and not reason:
        reason = (f"nn.MultiheadAttention {lay.module!r} derives its attention scale from head_dim: removing head "
                  "dimensions would change its output; prune heads instead")
    return UnitGroup(lay.group_name(kind), kind, lay.group_size(kind), slices, prunable=not reason,
                     root=lay.module, reason=reason)


def _refuse_rotary(model: nn.Module, layouts: Sequence[AttentionLayout]) -> None:
    """Rotary embeddings rotate entry d of each head with entry d + head_dim/2 by frequencies derived from
    head_dim (`inv_freq`): a head-dim unit would have to be a rotary pair and the frequencies re-derived."""
    rope = [n for n, m in model.named_modules() if "rotary" in type(m).__name__.lower()]
    cfg = getattr(model, "config", None)
    if not rope and not any(getattr(cfg, a, None) is not None for a in ("rope_theta", "rope_parameters")):
        return
    lay = next((x for x in layouts if x.family == "hf"), layouts[0])
    raise TraceError(
        f"units=('head_dim', ...): attention {lay.module!r} uses rotary position embeddings"
        f"{f' ({rope[0]!r})' if rope else ''}, which pair entry d of each head with entry d + head_dim/2 and derive "
        "their frequencies from head_dim; head_dim units are not supported for rotary attention, prune heads "
        "(units=('kv_head', ...)) instead"
    )


def _read_functionally(structure: Structure, layouts: list[AttentionLayout], model: nn.Module,
                       inputs: tuple[Any, ...] | dict[str, Any] | None) -> list[AttentionLayout]:
    """Keep a `functional_qkv` layout only where the trace confirms it: Torch-Pruning couples no axis of its qkv
    weight, and (given the example inputs) the forward never calls the qkv module (a module the caller ignored,
    or one Torch-Pruning mis-maps, is called). Otherwise Torch-Pruning's own groups stay."""
    coupled = {s.param for g in structure.groups for s in g.slices}
    out = [lay for lay in layouts if lay.family != "functional_qkv" or lay.inputs[0][0] not in coupled]
    qkv = {f"{lay.module}.qkv" for lay in out if lay.family == "functional_qkv"}
    if qkv and inputs is not None:
        called = called_modules(model, inputs, qkv)
        out = [lay for lay in out if lay.family != "functional_qkv" or f"{lay.module}.qkv" not in called]
    return out


def apply_attention_units(
    structure: Structure,
    model: nn.Module,
    units: Iterable[str] = DEFAULT_UNITS,
    heads: Mapping[str, HeadOverride] | None = None,
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
) -> tuple[Structure, list[AttentionLayout]]:
    """Replace the row-level groups of every discovered attention's head axes by one head-level group per
    attention module, and classify the hidden and MLP groups (see the module docstring).

    `example_inputs` (normalized) confirm attention read functionally (`_read_functionally`).
    Returns the new structure (no cost ops yet) and the layouts (for `apply_attention_costs`).
    """
    units = _check_units(units)
    layouts = _read_functionally(structure, discover_attention(model, heads), model, example_inputs)
    if not layouts:
        return structure, layouts
    if "head_dim" in units:
        _refuse_rotary(model, layouts)
    head_keys = {(s.param, s.axis) for lay in layouts for s in lay.segments}
    input_keys = {k for lay in layouts for k in lay.inputs}
    new_groups: list[UnitGroup] = []
    placed: dict[int, list[UnitGroup]] = {}
    pending: list[UnitGroup] = []
    lay_of_group = {}
    for lay in layouts:
        kind = lay.kind(units)
        hg = _head_group(lay, kind, structure, units)
        keys = {(s.param, s.axis) for s in lay.segments}
        lay_of_group[hg.name] = keys
        pending.append(hg)
    for g in structure.groups:
        kept = tuple(s for s in g.slices if (s.param, s.axis) not in head_keys)
        touched = len(kept) != len(g.slices)
        if touched:  # insert the head groups whose slices this group held, where it was
            for hg in list(pending):
                if any((s.param, s.axis) in lay_of_group[hg.name] for s in g.slices):
                    placed.setdefault(len(new_groups), []).append(hg)
                    pending.remove(hg)
        if not kept:
            continue
        g = replace(g, slices=kept) if touched else g
        if any((s.param, s.axis) in input_keys for s in g.slices):
            mha = [lay.module for lay in layouts if lay.family == "torch_mha"
                   and any((sl.param, sl.axis) in set(lay.inputs) for sl in g.slices)]
            why = "" if "hidden" in units else HIDDEN_REASON
            if mha and not why:
                why = (f"nn.MultiheadAttention {mha[0]!r} ties its q/k/v width to embed_dim, which Torch-Pruning "
                       f"prunes with the hidden width; trace with heads={{{mha[0]!r}: None}} to prune the hidden width")
            sized = [lay.module for lay in layouts if lay.family == "q_kv"
                     and any((sl.param, sl.axis) in set(lay.inputs) for sl in g.slices)]
            if sized and not why:
                why = (f"attention {sized[0]!r} reshapes its heads' output to its input width, so the heads' width "
                       "(which stays whole) must equal the hidden width")
            reason = "; ".join(r for r in (g.reason, why) if r)
            g = replace(g, kind="hidden", prunable=g.prunable and not why, reason=reason)
        elif g.kind == "feature" and g.prunable:
            on = "mlp_feature" in units
            g = replace(g, kind="mlp_feature", prunable=on, reason="" if on else _not_selected("mlp_feature"))
        new_groups.append(g)
    out: list[UnitGroup] = []
    for i, g in enumerate(new_groups):
        out.extend(placed.get(i, ()))
        out.append(g)
    out.extend(placed.get(len(new_groups), ()))
    out.extend(pending)  # heads whose rows Torch-Pruning left in no group
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}

    def position(g: UnitGroup) -> int:  # trace's rule: groups in the order of their roots in named_modules()
        if g.root in order:
            return order[g.root]
        return order.get(g.root.rpartition(".")[0], len(order))

    out.sort(key=position)
    touched_params = {s.param for g in out for s in g.slices}
    uncoupled = tuple(p for p in structure.uncoupled if p not in touched_params)
    return replace(structure, groups=tuple(out), ops=(), uncoupled=uncoupled), layouts


def apply_attention_costs(structure: Structure, layouts: Sequence[AttentionLayout],
                          units: Iterable[str] = DEFAULT_UNITS) -> Structure:
    """Make the `heads` axis (or, for `head_dim` units, the `head_dim` axis) of every attention score/context
    matmul (`attn_qk`/`attn_av` ops in an attention module's scope) follow that module's head group, so active
    MACs drop with pruned heads."""
    units = tuple(units)
    by_module = {lay.module: lay for lay in layouts}
    ops = []
    for op in structure.ops:
        lay = by_module.get(op.module)
        if lay is None or op.kind not in ("attn_qk", "attn_av"):
            ops.append(op)
            continue
        kind = lay.kind(units)
        gname = lay.group_name(kind)
        axes = []
        for a in op.axes:
            if kind == "head_dim" and a.name == "head_dim" and a.size == lay.head_dim and gname in structure.group_map:
                a = CostAxis("head_dim", a.size, parts=(AxisPart(gname, runs_from_list(list(range(a.size)))),))
            elif kind != "head_dim" and a.name == "heads" and a.size == lay.num_heads and gname in structure.group_map:
                a = CostAxis("heads", a.size, parts=(AxisPart(gname, runs_from_list(lay.head_units(kind))),))
            axes.append(a)
        ops.append(replace(op, axes=tuple(axes)))
    return replace(structure, ops=tuple(ops))

