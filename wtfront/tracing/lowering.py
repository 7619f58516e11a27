"""Torch-Pruning's groups lowered to `UnitGroup`s: a unit per root channel (root channels that reach one channel
of some layer are one unit), and per parameter axis a `Slice` whose `index[i]` is the unit of entry `i`, under the
model's canonical parameter names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch_pruning.dependency.node import Node

from wtcore.errors import TraceError
from wtcore.ir import Param, Slice, Structure, UnitGroup, runs_from_list

from .constant import constant_input_groups
from .coverage import mark_partial_coverage, unrooted_reason
from .graph import DependencyGraph
from .groups import NO_ROOT
from .nodes import TP_DUMMY, nearest_named
from .rotary import ROTARY_REASON
from .slicers import MisMapped, RawSlice, UnloweredModule, known_params, lower_item, rule_type
from .splits import SPLIT_REASON

__all__ = ["OUTPUT_REASON", "Lowering", "diverged_reason", "mismapped_reason"]


def _distrust_overlaps(groups: list[UnitGroup], names: set[str], untrusted: Sequence[frozenset]) -> list[UnitGroup]:
    """Groups sharing a parameter axis with a group whose walk was not trusted are not prunable either: both
    walked the same width, and only one of them can be right."""
    shared = frozenset().union(*untrusted) if untrusted else frozenset()
    out = []
    for g in groups:
        if g.prunable and g.name not in names and any((sl.param, sl.axis) in shared for sl in g.slices):
            g = UnitGroup(g.name, g.kind, g.size, g.slices, False, g.root, g.baseline_size,
                          "shares parameter axes with a group Torch-Pruning mis-maps, so its units may not be closed")
        out.append(g)
    return out


def mismapped_reason(modules: Sequence[str]) -> str:
    """Why a group whose walk mis-mapped some layers (their slices dropped) is not prunable."""
    shown = ", ".join(repr(m) for m in modules[:3]) + (f" (+{len(modules) - 3})" if len(modules) > 3 else "")
    return f"Torch-Pruning mis-maps the channels of {shown} in this group, so its units are not closed"


def diverged_reason(modules: Sequence[str]) -> str:
    """Why a group whose walk diverged (and was stopped there) is not prunable."""
    near = ", ".join(repr(m) for m in dict.fromkeys(modules[:3])) or "a parameter-free op"
    return (f"Torch-Pruning's channel index mappings diverge next to {near} (e.g. a window partition or a "
            "relative-position bias), so the walk was stopped there and the group is not closed")


def _owned(param: str, boundary: str) -> bool:
    """Whether `param` is the boundary parameter or belongs to the boundary module."""
    return param == boundary or param.startswith(f"{boundary}.") or not boundary

OUTPUT_REASON = "feeds the model output"


def _join_units(relabel: np.ndarray, same: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
    """(unit of each TP root index, number of units): root indices that reach one channel of some layer are one
    unit, numbered in order of their first root channel; without such pairs, one unit per root channel."""
    size = len(relabel)
    pairs = [(a[ok], b[ok]) for a, b in same if (ok := (a != NO_ROOT) & (b != NO_ROOT)).any()]
    if not pairs:
        return relabel, size
    code = np.unique(np.concatenate([relabel[a] * size + relabel[b] for a, b in pairs]))
    x, y = code // size, code % size
    label = np.arange(size)
    while True:  # smallest label over each connected set of root channels: propagate along edges, then jump
        low = np.minimum(label[x], label[y])
        new = label.copy()
        np.minimum.at(new, x, low)
        np.minimum.at(new, y, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    _, unit = np.unique(label, return_inverse=True)  # a set's label is its smallest root channel
    return unit[relabel], int(unit.max()) + 1


@dataclass
class _Acc:
    """Index entries of one (param, axis) in one group, merged over every item that touches it."""

    length: int
    groups: int
    group_axis: int
    index: np.ndarray


class Lowering:
    """Turns TP groups into UnitGroups; holds the canonical parameter naming of the model."""

    def __init__(
        self, model: nn.Module, dg: DependencyGraph, ignored: Sequence[nn.Module], root_types: tuple[type, ...]
    ) -> None:
        self.model = model
        self.root_types = root_types
        self.dg = dg
        self.ignored = {id(m) for m in ignored}
        self.module_names: dict[int, str] = {}
        self.module_order: dict[int, int] = {}
        self.modules_by_name: dict[str, nn.Module] = {}
        for i, (name, m) in enumerate(model.named_modules()):
            self.module_names.setdefault(id(m), name)
            self.module_order.setdefault(id(m), i)
            self.modules_by_name[name] = m
        # canonical names by tensor identity: the first name wins, later names are aliases
        self.canonical: dict[int, str] = {}
        self.by_name: dict[str, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canon = self.canonical.setdefault(id(p), name)
            self.by_name[name] = canon
            if canon == name:
                self.tensors[name] = p
                aliases[name] = []
            elif name not in aliases[canon]:
                aliases[canon].append(name)
        self.aliases = aliases
        self.param_order = {n: i for i, n in enumerate(self.tensors)}
        self.outputs = self._output_reaching_nodes()
        self.lowered_modules: dict[int, nn.Module] = {}
        self.names_by_id = {**self.module_names, **self.canonical}
        self.boundaries: dict[str, str] = {}  # module -> why Torch-Pruning's mapping of it cannot be used
        self.mismapped: dict[str, str] = {}  # module/parameter -> how one group's walk mis-mapped it

    # -- names -----------------------------------------------------------------------------------
    def module_name(self, m: Any) -> str:
        if isinstance(m, torch.Tensor):
            return self.canonical.get(id(m), "<unwrapped parameter>")
        name = self.module_names.get(id(m))
        return name if name is not None else str(m)

    def param_name(self, s: RawSlice, item_name: str) -> str:
        """Canonical name of the parameter a raw slice refers to (through aliases, nn.utils.prune's `_orig`
        and parametrize's `.original`)."""
        if s.owner is None:
            canon = self.canonical.get(id(s.tensor))
            if canon is None:
                raise TraceError(f"Torch-Pruning coupled a tensor of shape {tuple(s.tensor.shape)} that is not a "
                                 "parameter of the model")
            return canon
        qual = f"{item_name}.{s.attr}" if item_name else s.attr
        prefix, _, leaf = qual.rpartition(".")
        dot = f"{prefix}." if prefix else ""
        for candidate in (qual, f"{qual}_orig", f"{dot}parametrizations.{leaf}.original"):
            canon = self.by_name.get(candidate)
            if canon is not None:
                if tuple(self.tensors[canon].shape) != tuple(s.tensor.shape):
                    break
                return canon
        raise UnloweredModule(
            f"parameter {qual!r} of {item_name!r} could not be matched to a parameter of the model with the same "
            "shape (a parametrization that changes its shape?)"
        )

    def is_ignored(self, target: Any) -> bool:
        """An ignored module, or an unwrapped parameter owned by one."""
        if isinstance(target, torch.Tensor):
            owner = self.canonical.get(id(target), "").rpartition(".")[0]
            try:
                return id(self.model.get_submodule(owner)) in self.ignored
            except AttributeError:
                return False
        return id(target) in self.ignored

    # -- outputs ---------------------------------------------------------------------------------
    def _output_reaching_nodes(self) -> set[Node]:
        """Nodes whose output reaches a model output through parameter-free ops only (TP's graph is built
        backwards from the outputs, so the nodes without outputs are exactly the model outputs)."""
        reach: set[Node] = set()
        stack = [n for n in self.dg.module2node.values() if not n.outputs]
        while stack:
            n = stack.pop()
            if n in reach:
                continue
            reach.add(n)
            if isinstance(n.module, TP_DUMMY):
                stack.extend(n.inputs)
        return reach

    # -- groups ----------------------------------------------------------------------------------
    def run(self, tp_groups: Sequence[Any], model_name: str) -> Structure:
        self.members: list[set[str]] = []  # per lowered group: the modules/parameters its items reach
        self.untrusted: list[bool] = []  # per lowered group: its walk diverged or mis-mapped a layer
        entries = [(*self.lower_group(g), i) for i, g in enumerate(tp_groups)]
        entries.sort(key=lambda e: e[0])
        groups: list[UnitGroup] = []
        members: list[set[str]] = []
        used: set[str] = set()
        untrusted: list[frozenset[tuple[str, int]]] = []
        untrusted_names: set[str] = set()
        for _, ug, i in entries:
            if self.untrusted[i]:  # untrusted walks from several roots of one width: keep the first of each
                axes = frozenset((sl.param, sl.axis) for sl in ug.slices)
                if any(axes <= seen for seen in untrusted):
                    continue
                untrusted.append(axes)
            members.append(self.members[i])
            name, k = ug.name, 2
            while name in used:
                name, k = f"{ug.name}#{k}", k + 1
            used.add(name)
            if name != ug.name:
                ug = UnitGroup(name, ug.kind, ug.size, ug.slices, ug.prunable, ug.root, ug.baseline_size, ug.reason)
            if self.untrusted[i]:
                untrusted_names.add(name)
            groups.append(ug)
        groups = _distrust_overlaps(groups, untrusted_names, untrusted)
        self.check_unknown_params()
        groups = self.apply_boundaries(groups, members)
        groups = mark_partial_coverage(groups, {n: tuple(t.shape) for n, t in self.tensors.items()})
        extra = constant_input_groups(self.dg.constant_inputs, self.module_names, self.canonical, groups)
        if extra:  # in named_modules() order of their roots, like every group
            last = len(self.module_order)
            groups = sorted([*groups, *extra], key=lambda g: self.module_order.get(
                id(self.modules_by_name.get(g.root)), last))
        touched = {s.param for g in groups for s in g.slices}
        params = tuple(self.make_param(n) for n in self.tensors)
        uncoupled = tuple(sorted(n for n in self.tensors if n not in touched))
        for m in self.ignored_with_params():
            self.boundaries.setdefault(m, "passed in ignore=")
        for m, why in self.mismapped.items():  # a reason for what ends in no group
            if any(_owned(p, m) for p in uncoupled):
                self.boundaries.setdefault(m, f"Torch-Pruning mis-maps it in every group that reaches it: {why}")
        boundaries = tuple(sorted(self.boundaries.items()))
        return Structure(params, tuple(groups), (), model_name, uncoupled, boundaries)

    # -- boundaries ------------------------------------------------------------------------------
    def add_boundary(self, target: Any, name: str, why: str) -> None:
        """Record the module (or unwrapped parameter) Torch-Pruning mis-maps as a boundary."""
        if isinstance(target, torch.Tensor):
            name = self.canonical.get(id(target), name)
        self.boundaries.setdefault(name, f"Torch-Pruning mis-maps it, so it is left static: {why}")

    def apply_boundaries(self, groups: list[UnitGroup], members: Sequence[set[str]]) -> list[UnitGroup]:
        """Groups reaching a boundary module lose its slices (its axes stay static) and are not prunable, since
        removing their units would change the widths the module reads or writes; groups left with no slices go."""
        if not self.boundaries:
            return groups
        out = []
        for g, reached in zip(groups, members):
            hit = [m for m in self.boundaries
                   if m in reached or any(_owned(sl.param, m) for sl in g.slices)]
            if not hit:
                out.append(g)
                continue
            slices = tuple(sl for sl in g.slices if not any(_owned(sl.param, m) for m in hit))
            if not slices:
                continue
            why = f"coupled to {', '.join(repr(m) for m in hit[:3])}, which Torch-Pruning mis-maps (left static)"
            out.append(UnitGroup(g.name, g.kind, g.size, slices, False, g.root, g.baseline_size,
                                 "; ".join(r for r in (g.reason, why) if r)))
        return out

    def ignored_with_params(self) -> list[str]:
        return [self.module_names[i] for i in self.ignored
                if i in self.module_names and any(True for _ in self.modules_by_name[self.module_names[i]]
                                                  .parameters(recurse=False))]

    def make_param(self, name: str) -> Param:
        t = self.tensors[name]
        owner = name.rpartition(".")[0]
        mod = self.modules_by_name.get(owner) or self.model.get_submodule(owner)
        return Param(
            name=name,
            shape=tuple(int(d) for d in t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            module=owner,
            module_type=type(mod).__name__,
            aliases=tuple(self.aliases[name]),
        )

    def lower_group(self, group: Any) -> tuple[int, UnitGroup]:
        """One TP group as a UnitGroup, with its root's position in `named_modules()` (the sort key)."""
        dg = self.dg
        closed = getattr(group, "closed", None)
        root, relabel = self.choose_root(group) if closed is None else self.choose_covering_root(group)
        root_name = self.module_name(root)
        if closed is not None:
            size = closed.size
        elif not getattr(group, "diverged_at", ()):  # a diverged walk's couplings mean nothing (not prunable)
            relabel, size = _join_units(relabel, getattr(group, "same_units", ()))
        else:
            size = len(relabel)
        accs: dict[tuple[str, int], _Acc] = {}
        feeds_output = rotary = split = False
        unbalanced = closed.reason if closed is not None else ""  # why units closed across shuffles cannot go
        if closed is not None and not unbalanced and dg.module2node.get(root) not in closed.covering:
            unbalanced = ("coupled through a channel shuffle, and no layer's out-channels reach every unit of the "
                        "group, so physical pruning could not remove a unit from one layer")
        unrooted: list[str] = []
        reached: set[str] = set()
        self.members.append(reached)
        mismapped: list[str] = []
        diverged = [n for node in getattr(group, "diverged_at", ()) for n in nearest_named(node, self.names_by_id)]
        for node in getattr(group, "cut_at", ()):  # couplings a mapping dropped: name the modules next to them
            unrooted.extend(n for n in nearest_named(node, self.names_by_id) if n not in unrooted)
        for item in group:
            node: Node = item.dep.target
            target = node.module
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            if node in self.outputs and (out or isinstance(target, TP_DUMMY)):
                feeds_output = True
            rotary = rotary or node in dg.rotary
            split = split or node in dg.splits
            if isinstance(target, TP_DUMMY):
                continue
            name = self.module_name(target)
            reached.add(name)
            units = item.root_idxs
            local = item.idxs
            if units.size and units.min() == NO_ROOT:  # e.g. repeat_kv of grouped-query attention: keep
                lost = units == NO_ROOT  # what maps, mark the group (NO_ROOT is below every unit)
                if name not in unrooted:
                    unrooted.append(name)
                local, units = local[~lost], units[~lost]
                if not units.size:
                    continue
            pairs = (local, relabel[units])
            try:
                raws = lower_item(target, name, out=out, pairs=pairs, pruning_dim=node.pruning_dim)
                keyed = [(self.param_name(s, name), s) for s in raws]
            except MisMapped as e:  # the walk is wrong here, not the layer: this group is not closed
                mismapped.append(name)
                self.mismapped.setdefault(name, str(e))
                continue
            except UnloweredModule as e:
                if not self.is_ignored(target):
                    self.add_boundary(target, name, str(e))
                continue
            if isinstance(target, nn.Module):
                self.lowered_modules[id(target)] = target
            try:
                for pname, s in keyed:
                    self.merge(accs, pname, s, root_name)
            except MisMapped as e:
                mismapped.append(name)
                self.mismapped.setdefault(name, f"in the group of {root_name!r}, {e}")
        slices = [
            Slice(p, axis, runs_from_list(a.index), a.groups, a.group_axis)
            for (p, axis), a in sorted(accs.items(), key=lambda kv: (self.param_order[kv[0][0]], kv[0][1]))
        ]
        self.untrusted.append(bool(diverged or mismapped))
        order = self.module_order.get(id(root), len(self.module_order))
        return order, UnitGroup(
            name=f"{root_name}.out" if root_name else "out",
            kind="channel" if isinstance(root, nn.modules.conv._ConvNd) else "feature",
            size=size,
            slices=tuple(slices),
            prunable=not (feeds_output or unbalanced or unrooted or rotary or split or self.untrusted[-1]),
            root=root_name,
            reason="; ".join(r for r, on in ((OUTPUT_REASON, feeds_output), (unbalanced, unbalanced),
                                             (ROTARY_REASON, rotary), (SPLIT_REASON, split),
                                             (unrooted_reason(unrooted), unrooted),
                                             (diverged_reason(diverged), diverged),
                                             (mismapped_reason(mismapped), mismapped)) if on),
        )

    def choose_covering_root(self, group: Any) -> tuple[Any, np.ndarray]:
        """The root of a group closed across channel shuffles (`balance.Closed`): its earliest root-type module
        whose out-channels touch every atom, so Torch-Pruning's walk from that module's channels of a unit
        removes the whole unit; TP's root if there is none. Units keep their numbering."""
        closed = group.closed
        best: tuple[int, Any] | None = None
        for item in group:
            m = item.dep.target.module
            if (item.dep.target in closed.covering and isinstance(m, self.root_types) and id(m) not in self.ignored
                    and self.dg.is_out_channel_pruning_fn(item.dep.handler)):
                order = self.module_order.get(id(m), len(self.module_order))
                if best is None or order < best[0]:
                    best = (order, m)
        return (group[0].dep.target.module if best is None else best[1]), np.arange(closed.size, dtype=np.int64)

    def choose_root(self, group: Any) -> tuple[Any, np.ndarray]:
        """Root the group at its earliest module (in `named_modules` order) whose out-channels are pruned
        one-to-one with the units and whose type is a root type, and relabel units as that module's channels.

        TP roots a group at the first layer it meets walking back from the outputs (a ViT's hidden dimension
        at the last MLP); naming it after the layer that creates the dimension (the patch embedding) reads
        better and does not depend on TP's traversal order. Returns (root, relabel) with relabel[tp_unit].
        """
        tp_root = group[0].dep.target.module
        size = len(group[0].idxs)
        best: tuple[int, Any, np.ndarray] | None = None
        for item in group:
            m = item.dep.target.module
            if (
                not isinstance(m, self.root_types)
                or id(m) in self.ignored
                or not self.dg.is_out_channel_pruning_fn(item.dep.handler)
                or len(item.idxs) != size
            ):
                continue
            local, unit = item.idxs, item.root_idxs
            # one-to-one: every unit once, every local channel in range and once
            if not size or unit.min() < 0 or local.min() < 0 or local.max() >= size:
                continue
            if np.bincount(unit, minlength=size).max() > 1 or np.bincount(local, minlength=size).max() > 1:
                continue
            order = self.module_order.get(id(m), len(self.module_order))
            if best is None or order < best[0]:
                relabel = np.empty(size, dtype=np.int64)
                relabel[unit] = local
                best = (order, m, relabel)
        if best is None:
            return tp_root, np.arange(size, dtype=np.int64)
        return best[1], best[2]

    @staticmethod
    def merge(accs: dict[tuple[str, int], _Acc], pname: str, s: RawSlice, root_name: str) -> None:
        key = (pname, s.axis)
        acc = accs.get(key)
        pos = s.positions
        if acc is None:
            acc = accs[key] = _Acc(s.length, s.groups, s.group_axis, np.full(s.length, -1, dtype=np.int64))
            if pos.size < 2 or (pos[1:] > pos[:-1]).all():  # first item on this axis, no position twice
                acc.index[pos] = s.units
                return
        elif (acc.length, acc.groups, acc.group_axis) != (s.length, s.groups, s.group_axis):
            raise MisMapped(
                f"{pname!r} axis {s.axis} is reached twice with different layouts "
                f"({acc.length}/{acc.groups} vs {s.length}/{s.groups} entries/groups)"
            )
        have = acc.index[pos]
        clash = (have != -1) & (have != s.units)
        if not clash.any():
            if pos.size < 2 or (pos[1:] > pos[:-1]).all():  # increasing (the usual order): no position twice
                acc.index[pos] = s.units
                return
            # the same position listed twice within one item with two units is a clash too
            order = np.argsort(s.positions, kind="stable")
            pos, units = s.positions[order], s.units[order]
            dup = (pos[1:] == pos[:-1]) & (units[1:] != units[:-1])
            if dup.any():
                k = int(np.flatnonzero(dup)[0])
                clash_pos, have_u, new_u = int(pos[k]), int(units[k]), int(units[k + 1])
            else:
                acc.index[s.positions] = s.units
                return
        else:
            k = int(np.flatnonzero(clash)[0])
            clash_pos, have_u, new_u = int(s.positions[k]), int(have[k]), int(s.units[k])
        raise MisMapped(
            f"entry {clash_pos} of {pname!r} axis {s.axis} is coupled to two different units ({have_u} and {new_u})"
        )

    def check_unknown_params(self) -> None:
        """A module in a group with parameters its TP pruner never touches would be broken by pruning: it
        becomes a boundary."""
        for m in self.lowered_modules.values():
            if id(m) in self.ignored:
                continue
            t = rule_type(m)
            known = known_params(m)
            extra = [n for n, p in m._parameters.items() if p is not None and n.removesuffix("_orig") not in known]
            if extra:
                name = self.module_name(m)
                self.add_boundary(m, name, f"module {name!r} ({type(m).__name__}) has parameters {extra} that "
                                           f"Torch-Pruning's {t.__name__ if t else ''} pruner does not prune")
