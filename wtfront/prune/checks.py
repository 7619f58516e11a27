"""What physical pruning refuses before it touches the model: stale structures, cuts of grouped convolutions
Torch-Pruning gets silently wrong, and groups where removing units is not the same function as zeroing them
(`lossy_groups`); and the Torch-Pruning graph and groups those checks and the pruning itself use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from wtcore.errors import WtError
from wtcore.ir import Structure, UnitGroup

from ..modules import slice_modules
from ..tracing.budget import Budget, BudgetExceeded
from ..tracing.graph import DependencyGraph
from ..tracing.inputs import forward_outputs, normalize_inputs
from ..tracing.lossy import group_lossy_reason, normalized_reason
from ..tracing.state import tracing_state
from .surgery import ir_surgery_groups

__all__ = ["PruneError", "check_fresh", "check_grouped_convs", "dependency_graph", "lossy_groups",
           "removal_lossy_reason", "tied_tp_groups", "tp_group", "tp_lossy_reason"]


class PruneError(WtError):
    """Physical pruning refused or failed; the model is unchanged (restored bit-identical)."""


def dependency_graph(model: nn.Module, inputs: Any, budget: Budget) -> DependencyGraph:
    """Torch-Pruning's graph of `model` as `trace` builds it (wt's fixes, the model's state restored), to
    prune through."""
    with tracing_state(model):
        dg = DependencyGraph(budget)
        dg.build_dependency(model, example_inputs=inputs, forward_fn=forward_outputs, verbose=False)
    return dg


def _root(model: nn.Module, g: UnitGroup) -> Any:
    try:
        return model.get_submodule(g.root)
    except AttributeError:
        try:
            return model.get_parameter(g.root)
        except AttributeError:
            raise PruneError(f"group {g.name!r}: its root {g.root!r} is not in the model; re-trace it") from None


def _root_channels(g: UnitGroup, root: Any, idxs: list[int]) -> list[int]:
    """The root's out-channels of units `idxs`: the units themselves, unless a unit spans several of the root's
    channels (units closed across a channel shuffle, `wtfront.tracing.balance`)."""
    if not isinstance(root, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(root, "transposed", False):
        return idxs
    s = next((s for s in g.slices if s.param == f"{g.root}.weight" and s.axis == 0 and s.groups == 1), None)
    if s is None:
        return idxs
    units = s.unit_ids()
    if len(units) <= g.size:
        return idxs
    return np.flatnonzero(np.isin(units, np.asarray(sorted(idxs), dtype=np.int64))).tolist()


def tp_group(dg: DependencyGraph, model: nn.Module, g: UnitGroup, idxs: list[int]) -> Any:
    """Torch-Pruning's pruning group that removes units `idxs` of `g` (its root's out-channels)."""
    root = _root(model, g)
    pruner = dg.get_pruner_of_module(root)
    if pruner is None:
        raise PruneError(f"group {g.name!r}: Torch-Pruning has no pruning function for its root {g.root!r}")
    return dg.get_pruning_group(root, pruner.prune_out_channels, _root_channels(g, root, idxs))


def tied_tp_groups(dg: DependencyGraph, structure: Structure, model: nn.Module, g: UnitGroup, idxs: list[int],
                   first: Any) -> list[Any]:
    """Torch-Pruning's groups for the out-channels of `g` that `first` (its root's group) does not reach: a
    group merged over a tied weight (`tracing.ties`) spans several of Torch-Pruning's groups. Computed after
    `first` was pruned, in the pruned graph. Empty for groups without a tied parameter."""
    pmap = structure.param_map
    if not any(pmap[s.param].aliases for s in g.slices if s.param in pmap):
        return []
    reached = {id(item.dep.target.module) for item in first if dg.is_out_channel_pruning_fn(item.dep.handler)}
    unit_set = np.asarray(sorted(idxs), dtype=np.int64)
    out = []
    for s in g.slices:
        owner, _, leaf = s.param.rpartition(".")
        if leaf != "weight" or s.axis != 0 or s.groups != 1:
            continue
        try:
            m = model.get_submodule(owner)
        except AttributeError:
            continue
        if id(m) in reached or not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or m not in dg.module2node:
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None:
            continue
        local = np.flatnonzero(np.isin(s.unit_ids(), unit_set)).tolist()
        group = dg.get_pruning_group(m, pruner.prune_out_channels, local)
        reached |= {id(item.dep.target.module) for item in group if dg.is_out_channel_pruning_fn(item.dep.handler)}
        out.append(group)
    return out


def tp_lossy_reason(group: Any, names: Mapping[int, str]) -> str | None:
    """Why removing the channels of a Torch-Pruning group is not the same function as zeroing them (a norm
    over them, attention scaling), or None."""
    for item in group:
        mod = item.dep.target.module
        if isinstance(mod, nn.Module):
            why = normalized_reason(mod, names.get(id(mod), type(mod).__name__))
            if why:
                return why
    return None


def removal_lossy_reason(
    model: nn.Module, structure: Structure, dg: DependencyGraph, names: Mapping[int, str], gname: str,
    idxs: list[int], ir_cut: bool,
) -> str | None:
    """Why removing units `idxs` of group `gname` is not the same function as zeroing them, or None; groups cut
    from the IR (`ir_cut`) are read from their slices only, others also from Torch-Pruning's group."""
    g = structure.group_map[gname]
    if not ir_cut:
        why = tp_lossy_reason(tp_group(dg, model, g, idxs), names)
        if why:
            return why
    return group_lossy_reason(model, structure, g) or None


def lossy_groups(
    model: nn.Module, structure: Structure, example_inputs: Any, budget_s: float = 120.0
) -> dict[str, str]:
    """Prunable groups where removing units is *not* the same function as zeroing them (a norm over the
    units, attention scaling), with the reason. Pruning them needs `strict=False`."""
    budget = Budget(budget_s)
    names = {id(m): n for n, m in model.named_modules()}
    try:
        with budget.guard():
            dg = dependency_graph(model, normalize_inputs(example_inputs), budget)
            out = {}
            ir = ir_surgery_groups(model, structure, [g.name for g in structure.groups if g.prunable])
            for g in structure.groups:
                if g.prunable:
                    reason = removal_lossy_reason(model, structure, dg, names, g.name, [0], g.name in ir)
                    if reason:
                        out[g.name] = reason
            return out
    except BudgetExceeded:
        raise PruneError(f"building the dependency graph did not finish within budget_s={budget_s:g} s") from None


def check_grouped_convs(model: nn.Module, structure: Structure, removed: Mapping[str, list[int]]) -> None:
    """Refuse cuts of grouped (non-depthwise) convolutions that Torch-Pruning would get silently wrong."""
    for gname, units in removed.items():
        g = structure.group_map[gname]
        gone = set(units)
        for s, mname, m in slice_modules(model, structure, g):
            if not isinstance(m, nn.modules.conv._ConvNd) or m.groups == 1:
                continue
            if m.groups == m.out_channels and not m.transposed:
                continue  # depthwise: Torch-Pruning removes channel and group together
            idx = torch.tensor(s.index_list())
            hit = torch.tensor([int(u) in gone for u in idx.tolist()], dtype=torch.bool) & (idx >= 0)
            if not bool(hit.any()):
                continue
            where = f"group {gname!r} removes channels of grouped convolution {mname!r} (groups={m.groups})"
            if m.transposed:
                raise PruneError(f"{where}: Torch-Pruning cannot prune grouped transposed convolutions; pass the "
                                 f"module in ignore= when tracing")
            per_group = hit.view(m.groups, -1)
            if s.groups > 1 and s.param.endswith("weight") and s.axis == 1:
                if not bool((per_group == per_group[0]).all()):
                    raise PruneError(
                        f"{where}: its input slice must lose the same positions in every group (Torch-Pruning keeps "
                        f"group 0's positions for all groups, which would silently mix channels). Remove whole "
                        f"position sets ({{g * {per_group.shape[1]} + j for every group g}}) or ignore the module"
                    )
            else:
                counts = per_group.sum(1)
                if not bool((counts == counts[0]).all()):
                    raise PruneError(
                        f"{where}: its output channels must lose the same number of channels in every group "
                        f"(now {counts.tolist()}); otherwise rows move to other groups silently"
                    )


def check_fresh(model: nn.Module, structure: Structure) -> None:
    """Refuse a structure whose parameters the model no longer has with the same shapes (pruned since)."""
    for p in structure.params:
        try:
            t = model.get_parameter(p.name)
        except AttributeError:
            raise PruneError(f"parameter {p.name!r} of the structure is not in the model; re-trace it") from None
        if tuple(t.shape) != p.shape:
            raise PruneError(
                f"parameter {p.name!r} has shape {tuple(t.shape)} but the structure says {p.shape}: the structure is "
                "stale (the model was pruned since it was traced); use the structure prune_units returned"
            )

