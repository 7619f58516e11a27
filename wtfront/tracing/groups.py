"""Torch-Pruning's pruning groups, enumerated with index arrays instead of per-channel Python objects.

`DependencyGraph.get_all_groups` walks the dependency graph once per root layer, refreshes every index
mapping of the graph for each group, and carries one `_HybridIndex` namedtuple per channel through every
dependency: 18 ms on ResNet-50, 0.8 s on DenseNet-121, often more than TP's own graph build. This module
does the same walk with the same semantics (same triggers, index mappings, de-duplication and merging,
see `DependencyGraph.get_pruning_group` and `Group.add_and_merge` in torch_pruning 1.6), with indices as
numpy arrays. TP's known index-mapping classes are applied vectorized, and so is a mapping with a `map_arrays`
method (wt's `shuffle.ShuffleMapping`); any other mapping is called as TP would, on `_HybridIndex` lists. A walk
that meets a channel shuffle becomes a channel walk whose units `balance` closes (`_coupled_group`), which goes
beyond TP: its walk there relabels units and leaves the chunks after the shuffle uneven.

The walk is bounded (`WalkLimits`): on some graphs TP's index mappings diverge (Swin's relative-position
bias path has reshapes TP reads as flattens, and each pass around the cycle multiplies the index set by 32,
which exhausts memory within a minute). A diverging walk raises `WalkDiverged` with the node where it
happened instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.nn as nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping as tp_im
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.pruner import function as tp_fn

from .balance import Closed, close_units

__all__ = ["MAX_CONTAINED", "Group", "GroupItem", "WalkDiverged", "WalkLimits", "all_groups", "in_range",
           "pruning_group"]

NO_ROOT = -1  # TP's root_idx=None (e.g. after a grouped-query-attention mapping)
MAX_CONTAINED = 512  # diverging nodes a contained walk may stop at before giving up


class Group(list):
    """A group's `GroupItem`s, and `cut_at`: the graph nodes where an index mapping dropped coupled channels
    (TP's grouped-query-attention mapping maps KV channels to *no* query channels), so the items are not
    everything that pruning a unit touches."""

    cut_at: list[Any]
    diverged_at: list[Any]  # nodes where the walk diverged and was stopped (`all_groups(..., contain=True)`)
    closed: Closed | None  # units closed and balanced across channel shuffles (root_idxs are then those units)
    # (a, b) root-index arrays: unit a[k] and unit b[k] reach one channel of some layer, so they are one unit
    same_units: list[tuple[np.ndarray, np.ndarray]]

    def __init__(self, items: Sequence[GroupItem] = (), cut_at: Sequence[Any] = (),
                 diverged_at: Sequence[Any] = (), closed: Closed | None = None,
                 same_units: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        super().__init__(items)
        self.cut_at = list(cut_at)
        self.diverged_at = list(diverged_at)
        self.closed = closed
        self.same_units = list(same_units)


@dataclass(frozen=True)
class WalkLimits:
    """Bounds of one group walk. A correct index set never holds more channels than the widest axis a
    layer can have, and a group never more entries than its items times that; beyond either, TP's
    mappings have diverged. `for_model` derives both from the model's largest parameter dimension."""

    max_index: int = 1 << 22  # largest index value / index-set size at any node
    max_total: int = 1 << 25  # index entries summed over one group's items (16 bytes each with roots)

    @staticmethod
    def for_model(model: nn.Module, slack: int = 4) -> WalkLimits:
        widest = max((int(d) for p in model.parameters() for d in p.shape), default=1)
        max_index = max(slack * widest, 1 << 16)
        return WalkLimits(max_index=max_index, max_total=max(1 << 25, 64 * max_index))


class WalkDiverged(Exception):
    """TP's index mappings grew an index set past `WalkLimits` at `node` (a TP graph node) while walking the
    group of `root` (a module): the walk would not end, or not before memory runs out."""

    def __init__(self, root: Any, node: Any, what: str, value: int, limit: int) -> None:
        super().__init__(f"{what} reached {value} (limit {limit}) at {getattr(node, 'name', node)}")
        self.root, self.node, self.what, self.value, self.limit = root, node, what, value, limit


@dataclass
class GroupItem:
    """One (dependency, indices) pair of a group: `idxs` are module-local channels, `root_idxs` their units."""

    dep: Dependency
    idxs: np.ndarray
    root_idxs: np.ndarray


def _apply(mapping: Any, idx: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One TP index mapping on (idx, root) arrays, vectorized for TP's own mapping classes and for mappings with a
    `map_arrays` method (wt's, e.g. `shuffle.ShuffleMapping`)."""
    map_arrays = getattr(mapping, "map_arrays", None)
    if map_arrays is not None:
        return map_arrays(idx, root)
    if isinstance(mapping, (tp_im._ConcatIndexMapping, tp_im._SplitIndexMapping)):
        lo = mapping.offset[0]
        if mapping.reverse == isinstance(mapping, tp_im._ConcatIndexMapping):  # this direction narrows
            above = idx >= lo
            if len(mapping.offset) < 2:  # TP's trailing mapping has no upper bound and is only safe below it
                if above.any():
                    raise IndexError(f"Torch-Pruning index mapping {mapping.offset} has no upper bound")
                return idx[above], root[above]
            keep = above & (idx < mapping.offset[1])
            return idx[keep] - lo, root[keep]
        return idx + lo, root
    if isinstance(mapping, tp_im._FlattenIndexMapping):
        s = mapping._stride
        if mapping.reverse:
            pairs = np.unique(np.stack([idx // s, root], 1), axis=0)  # TP dedupes with a set
            return pairs[:, 0], pairs[:, 1]
        return (np.repeat(idx * s, s) + np.tile(np.arange(s), idx.size)), np.repeat(root, s)
    if isinstance(mapping, tp_im._SliceIndexMapping):
        if mapping.reverse:
            return idx * mapping.step + mapping.start, root
        keep = (idx >= mapping.start) & (idx < mapping.end) & ((idx - mapping.start) % mapping.step == 0)
        return (idx[keep] - mapping.start) // mapping.step, root[keep]
    hybrid = [_helpers._HybridIndex(int(i), None if r == NO_ROOT else int(r)) for i, r in zip(idx, root)]
    out = mapping(hybrid)
    return (
        np.fromiter((h.idx for h in out), dtype=np.int64, count=len(out)),
        np.fromiter((NO_ROOT if h.root_idx is None else h.root_idx for h in out), dtype=np.int64, count=len(out)),
    )


def pruning_group(
    dg: Any, module: Any, pruning_fn: Any, n: int, limits: WalkLimits | None = None, blocked: frozenset = frozenset()
) -> Group:
    """`DependencyGraph.get_pruning_group(module, pruning_fn, range(n))`, merged, with array indices.

    The caller must have run `index_mapping.update_index_mapping(dg)` once (TP does it on every call).
    Raises `WalkDiverged` when an index set or the group outgrows `limits` (default `WalkLimits()`). The walk
    does not enter `blocked` nodes. Through a channel shuffle the group's units are closed and balanced
    (`Group.closed`): its `root_idxs` are those units, several channels of the root each.
    """
    limits = limits or WalkLimits()
    total = n
    if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruning_fn = tp_fn.prune_depthwise_conv_out_channels
    root_node = dg.module2node[module]
    idx = np.arange(n, dtype=np.int64)
    root_dep = Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node)
    items: list[tuple[Dependency, np.ndarray, np.ndarray]] = [(root_dep, idx, idx)]
    # index sets already walked per (node, handler), as bytes: a revisit with the same indices stops the walk
    seen: dict[tuple[Any, Any], set[bytes]] = {(root_node, pruning_fn): {idx.tobytes() + b"|" + idx.tobytes()}}
    visited: set[Any] = set()
    cut_at: list[Any] = []
    stack = [(root_dep, idx, idx)]
    while stack:
        dep, cur, cur_root = stack.pop()
        node, fn = dep.target, dep.handler
        visited.add(node)
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(fn) or new_dep.target in blocked:
                continue
            nidx, nroot = cur, cur_root
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    if isinstance(mapping, tp_im._GQAIndexMapping) and not mapping.reverse and nidx.size:
                        cut_at.append(new_dep.target)
                    if getattr(mapping, "couples_channels", False):  # a channel shuffle: root ids no longer
                        return _coupled_group(dg, root_dep, n, limits, blocked)  # name units
                    nidx, nroot = _apply(mapping, nidx, nroot)
            if nidx.size == 0:
                continue
            if nidx.size > limits.max_index:
                raise WalkDiverged(module, new_dep.target, "index set size", int(nidx.size), limits.max_index)
            top = int(nidx.max())
            if top >= limits.max_index:
                raise WalkDiverged(module, new_dep.target, "channel index", top, limits.max_index)
            done = seen.setdefault((new_dep.target, new_dep.handler), set())
            sig = nidx.tobytes() + b"|" + nroot.tobytes()
            if new_dep.target in visited and sig in done:
                continue
            done.add(sig)
            total += nidx.size
            if total > limits.max_total:
                raise WalkDiverged(module, new_dep.target, "index entries of the group", total, limits.max_total)
            items.append((new_dep, nidx, nroot))
            stack.append((new_dep, nidx, nroot))
    same: list[tuple[np.ndarray, np.ndarray]] = []
    return Group(_merge(dg, items, same), cut_at, same_units=same)


def _coupled_group(dg: Any, root_dep: Dependency, n: int, limits: WalkLimits, blocked: frozenset) -> Group:
    """The group of a walk that meets a channel-coupling mapping (`shuffle.ShuffleMapping`), with units closed
    and balanced (`balance.close_units`).

    Root ids cannot name units there (a channel is reached from several roots, and every path around the
    shuffles' cycles relabels them), so this walks channels instead: each (node, handler, channel) is a vertex,
    visited once, and every index mapping an edge; the atoms are the connected components. Every channel of each
    shuffle met is walked too, so the group holds all of the chunks' pieces whichever layer roots it."""
    keys: dict[tuple[Any, Any], int] = {}
    deps: list[Dependency] = []
    reached: list[np.ndarray] = []  # per key: vertex id of each channel, -1 if not reached
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    count = [0]

    def visit(dep: Dependency, idx: np.ndarray) -> np.ndarray:
        """Vertex ids of `idx` at dep's (target, handler); queues the channels not reached before."""
        key = (dep.target, dep.handler)
        k = keys.get(key)
        if k is None:
            k = keys[key] = len(deps)
            deps.append(dep)
            reached.append(np.full(0, -1, dtype=np.int64))
        if idx.size and int(idx.max()) >= limits.max_index:
            raise WalkDiverged(root_dep.target.module, dep.target, "channel index", int(idx.max()), limits.max_index)
        ids = reached[k]
        if idx.size and int(idx.max()) >= ids.size:
            ids = reached[k] = np.concatenate([ids, np.full(int(idx.max()) + 1 - ids.size, -1, dtype=np.int64)])
        new = np.unique(idx[ids[idx] < 0])
        ids[new] = np.arange(count[0], count[0] + new.size)
        count[0] += new.size
        if count[0] > limits.max_total:
            raise WalkDiverged(root_dep.target.module, dep.target, "index entries of the group", count[0],
                               limits.max_total)
        if new.size:
            queue.append((dep, new))
        return ids[idx]

    queue: list[tuple[Dependency, np.ndarray]] = []
    visit(root_dep, np.arange(n, dtype=np.int64))
    seeded: set[Any] = set()
    while queue:
        while queue:
            dep, cur = queue.pop()
            src = reached[keys[(dep.target, dep.handler)]][cur]
            for new_dep in dep.target.dependencies:
                if not new_dep.is_triggered_by(dep.handler) or new_dep.target in blocked:
                    continue
                nidx, nsrc = cur, src
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        if getattr(mapping, "couples_channels", False):
                            for end in (new_dep.source, new_dep.target):
                                if end not in seeded:
                                    seeded.add(end)
                                    fn = dg.get_pruner_of_module(end.module).prune_out_channels
                                    visit(Dependency(fn, fn, source=end, target=end),
                                          np.arange(mapping.channels, dtype=np.int64))
                        nidx, nsrc = _apply(mapping, nidx, nsrc)
                if nidx.size:
                    edges.append((nsrc, visit(new_dep, nidx)))
    items = []
    for k, dep in enumerate(deps):
        idx = np.flatnonzero(reached[k] >= 0)
        items.append((dep, idx, reached[k][idx]))
    closed = close_units(dg, items, count[0], edges)
    return Group(_merge(dg, [(dep, idx, closed.unit[v]) for dep, idx, v in items]), closed=closed)


def _merge(dg: Any, items: Sequence[tuple[Dependency, np.ndarray, np.ndarray]],
           same: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[GroupItem]:
    """`Group.add_and_merge`: one item per (target, handler), indices de-duplicated, first occurrence wins.

    A channel reached with two different root indices (GhostNet's primary conv feeds both halves of a
    concatenation, directly and through a depthwise conv) is pruned whenever either root index is: TP's
    group for one root index also cuts the other's channels. Those pairs go to `same` (the units are one)."""
    order: list[tuple[Any, Any]] = []
    parts: dict[tuple[Any, Any], list[tuple[Dependency, np.ndarray, np.ndarray]]] = {}
    ignored_params = getattr(dg, "ignored_params", [])
    for dep, idx, root in items:
        target = dep.target.module
        if isinstance(target, nn.Parameter) and any(target is p for p in ignored_params):
            continue
        key = (dep.target, dep.handler)
        if key not in parts:
            order.append(key)
            parts[key] = []
        parts[key].append((dep, idx, root))
    merged = []
    for key in order:
        group = parts[key]
        if len(group) == 1:
            merged.append(GroupItem(*group[0]))
            continue
        idx = np.concatenate([g[1] for g in group])
        root = np.concatenate([g[2] for g in group])
        _, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
        if same is not None:
            other = root != root[first][inverse]
            if other.any():
                same.append((root[first][inverse][other], root[other]))
        first.sort()
        merged.append(GroupItem(group[0][0], idx[first], root[first]))
    return merged


def in_range(dg: Any, item: GroupItem) -> bool:
    """Whether an item's channel indices fit its layer (TP mis-maps a layer when they do not)."""
    target = item.dep.target
    m = target.module
    if not item.idxs.size:
        return True
    if isinstance(m, nn.Parameter):
        dim = getattr(target, "pruning_dim", -1)
        n = m.shape[dim] if -m.dim() <= dim < m.dim() else None
    else:
        pruner = dg.get_pruner_of_module(m)
        if pruner is None:
            return True
        try:
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            n = pruner.get_out_channels(m) if out else pruner.get_in_channels(m)
        except Exception:  # TP's getters of unusual layers
            return True
    return n is None or int(item.idxs.max()) < int(n)


def all_groups(
    dg: Any,
    ignored_layers: Sequence[Any] = (),
    root_module_types: tuple[type, ...] = (),
    limits: WalkLimits | None = None,
    refresh_index_mapping: bool = True,
    contain: bool = False,
) -> Iterator[Group]:
    """`DependencyGraph.get_all_groups` with array indices (same roots, order and skipping rules); each walk
    bounded by `limits` (see `pruning_group`). `refresh_index_mapping=False` skips TP's index-mapping update
    when the caller has just built the graph (`build_dependency` ends with it). With `contain`, a walk that
    diverges is repeated without entering the node where it diverged (up to `MAX_CONTAINED` nodes per group),
    and the group records those nodes in `diverged_at`; otherwise `WalkDiverged` propagates."""
    if refresh_index_mapping:
        tp_im.update_index_mapping(dg)
    ignored = {id(m) for m in [*ignored_layers, *dg.IGNORED_LAYERS_IN_TRACING]}
    visited: set[int] = set()
    for m in list(dg.module2node.keys()):
        if id(m) in ignored or not isinstance(m, tuple(root_module_types)):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None or id(m) in visited:
            continue
        blocked: set[Any] = set()
        while True:
            try:
                group = pruning_group(dg, m, pruner.prune_out_channels, pruner.get_out_channels(m), limits,
                                      frozenset(blocked))
                break
            except WalkDiverged as e:
                if not contain or len(blocked) >= MAX_CONTAINED or e.node in blocked:
                    raise
                blocked.add(e.node)
        group.diverged_at = list(blocked)
        # a walk that diverged or mis-mapped a layer cannot be trusted: it claims no other root, whose own walk
        # may well be right (an MLP inside a block whose residual walk crossed a window partition)
        trusted = not blocked and (not contain or all(in_range(dg, item) for item in group))
        prunable = True
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                if trusted or item.dep.target.module is m:
                    visited.add(id(item.dep.target.module))
                if id(item.dep.target.module) in ignored:
                    prunable = False
        if prunable:
            yield group
