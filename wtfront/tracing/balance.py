"""Units of a group walked through a channel shuffle (`wtfront.tracing.shuffle`): closed, then balanced.

Through a shuffle a Torch-Pruning root channel no longer names one unit: the shuffle mapping couples the channels
of one view position, so the walk reaches a channel from several roots. The group walk (`groups.pruning_group`)
then walks channels instead, and the channels an index mapping connects are one *atom* (a connected component).
Atoms are closed, but removing one need not keep the model valid: a `chunk` (ShuffleNet's
`x1, x2 = x.chunk(2, dim=1)`) splits whatever width it gets in equal pieces, so a removal is valid only if it takes
as many channels from every piece. Each atom gets one integer per (split, piece > 0): its channels in that piece
minus its channels in the first; a unit is a set of atoms whose vectors sum to zero. The atoms are merged greedily
into such units, one coordinate at a time (the sparsest first, which in a chain of shuffles is the deepest),
always merging the unit with the largest imbalance with the opposite-signed unit that fits it best; the whole
group is balanced (the traced model is), so this ends with every unit balanced. A group left with one unit is not
prunable (`SHUFFLE_REASON`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch_pruning import ops as tp_ops

__all__ = ["SHUFFLE_REASON", "Closed", "balanced_units", "close_units"]

SHUFFLE_REASON = (
    "coupled through channel shuffles whose chunks split every unit unevenly unless all channels go "
    "together, so no removal keeps the chunks' pieces equal"
)


@dataclass(frozen=True)
class Closed:
    """The units of a coupled group: `unit[v]` for every vertex (node, handler, channel) of the walk, `size`
    units, the graph nodes whose out-channels touch every atom (a physical pruning walk from one of them reaches
    all the channels of the units it removes), and `reason` when the units cannot be removed independently (one
    unit, or a split the group does not cover)."""

    unit: np.ndarray
    size: int
    covering: frozenset
    reason: str


def _components(n: int, edges: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected component of each of `n` vertices (the smallest vertex id in it), by label propagation with
    pointer jumping over the edge arrays."""
    label = np.arange(n, dtype=np.int64)
    if not edges:
        return label
    a = np.concatenate([e[0] for e in edges])
    b = np.concatenate([e[1] for e in edges])
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        while True:
            jumped = new[new]
            if (jumped == new).all():
                break
            new = jumped
        if (new == label).all():
            return label
        label = new


def _imbalance(items: Sequence[tuple[Any, np.ndarray, np.ndarray]], comp: np.ndarray, n: int) -> np.ndarray | None:
    """[n atoms, coordinates]: per split node and piece > 0, the atom's channels in it minus those in piece 0;
    None if a split's pieces are not covered alike by the group (no removal could keep it balanced)."""
    cols = []
    done: set[Any] = set()
    for dep, _, _ in items:
        node = dep.target
        offsets = getattr(node.module, "offsets", None)
        if node.type != tp_ops.OPTYPE.SPLIT or not offsets or len(offsets) < 3 or node in done:
            continue
        done.add(node)
        parts = [(i, r) for d, i, r in items if d.target is node]
        pos = np.concatenate([p[0] for p in parts])
        atom = comp[np.concatenate([p[1] for p in parts])]
        pos, first = np.unique(pos, return_index=True)
        atom = atom[first]
        piece = np.searchsorted(np.asarray(offsets), pos, side="right") - 1
        counts = np.zeros((n, len(offsets) - 1), dtype=np.int64)
        np.add.at(counts, (atom, piece), 1)
        cols.append(counts[:, 1:] - counts[:, :1])
    if not cols:
        return np.zeros((n, 0), dtype=np.int64)
    vec = np.concatenate(cols, 1)
    return None if vec.sum(0).any() else vec


def balanced_units(vec: np.ndarray) -> np.ndarray:
    """Unit of each atom: atoms merged into units whose imbalance vectors are zero (see the module docstring)."""
    n = vec.shape[0]
    members: dict[int, list[int]] = {a: [a] for a in range(n)}
    sums = {a: vec[a].copy() for a in range(n)}
    for c in sorted(range(vec.shape[1]), key=lambda c: (int(np.count_nonzero(vec[:, c])), c)):
        while True:
            live = [u for u in sums if sums[u][c]]
            if not live:
                break
            cur = max(live, key=lambda u: (abs(int(sums[u][c])), -u))
            want = -int(sums[cur][c])
            opposite = [u for u in live if (sums[u][c] > 0) == (want > 0)]
            fits = [u for u in opposite if abs(int(sums[u][c])) <= abs(want)]
            other = (
                max(fits, key=lambda u: (abs(int(sums[u][c])), -u))
                if fits
                else min(opposite, key=lambda u: (abs(int(sums[u][c])), u))
            )
            keep, gone = min(cur, other), max(cur, other)
            sums[keep] = sums[keep] + sums.pop(gone)
            members[keep] += members.pop(gone)
    unit = np.empty(n, dtype=np.int64)
    for k, u in enumerate(sorted(members)):
        unit[members[u]] = k
    return unit


def close_units(
    dg: Any, items: Sequence[tuple[Any, np.ndarray, np.ndarray]], n: int, edges: Sequence[tuple[np.ndarray, np.ndarray]]
) -> Closed:
    """The closed, balanced units of a channel walk: `items` are (dependency, channels, their vertex ids < `n`),
    `edges` pairs of vertex-id arrays that an index mapping connects."""
    comp = _components(n, edges)
    atoms, comp = np.unique(comp, return_inverse=True)  # atoms numbered by their smallest vertex (root first)
    n = atoms.size
    touched: dict[Any, set[int]] = {}
    for dep, _, root in items:
        if dg.is_out_channel_pruning_fn(dep.handler):
            touched.setdefault(dep.target, set()).update(np.unique(comp[root]).tolist())
    covering = frozenset(node for node, hit in touched.items() if len(hit) == n)
    vec = _imbalance(items, comp, n)
    if vec is None:
        return Closed(
            comp,
            n,
            covering,
            "a chunk after a channel shuffle splits channels of which only some are in "
            "this group, so no removal keeps its pieces equal",
        )
    unit_of_atom = balanced_units(vec)
    size = int(unit_of_atom.max()) + 1
    reason = ""
    if size < 2:
        reason = SHUFFLE_REASON
    return Closed(unit_of_atom[comp], size, covering, reason)
