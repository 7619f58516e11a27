"""Groups whose units are not closed: channels Torch-Pruning could not map to a unit, or axes it coupled only
in part. Pruning such a group's units would not remove what they stand for, so the group is not prunable."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from wtcore.errors import TraceError
from wtcore.ir import UnitGroup, runs_to_array

__all__ = ["mark_partial_coverage", "unrooted_reason"]


def unrooted_reason(modules: Sequence[str]) -> str:
    """Why a group is not prunable when channels coupled through `modules` map to no unit."""
    shown = ", ".join(repr(m) for m in modules[:3]) + (f" (+{len(modules) - 3})" if len(modules) > 3 else "")
    return (f"Torch-Pruning could not map channels coupled through {shown} to the group's units (e.g. repeat_kv "
            "of grouped-query attention), so its units are not closed")


def mark_partial_coverage(groups: list[UnitGroup], shapes: Mapping[str, tuple[int, ...]]) -> list[UnitGroup]:
    """Groups made not prunable where Torch-Pruning coupled only part of a parameter axis.

    Every axis a group touches must be covered entirely by the union of all groups' slices: Torch-Pruning
    marks a module visited once any group reaches its out-channels, so channels a group leaves out of a
    module it reaches never get a group of their own. That happens when it couples tensors of different
    widths element-wise (e.g. `scaled_dot_product_attention(..., enable_gqa=True)` with 8 query and 2 KV
    heads couples the first 16 of 64 query features with the 16 key features); such a group's units are not
    what pruning them would remove.
    """
    covered: dict[tuple[str, int, int], np.ndarray] = {}  # (param, axis, conv groups of the layout)
    full: set[tuple[str, int, int]] = set()  # axes one slice covers alone (the usual case: nothing to add up)
    for g in groups:
        for sl in g.slices:
            key = (sl.param, sl.axis, sl.groups)
            if key in full:
                continue
            if all(r.start >= 0 for r in sl.index):
                full.add(key)
                continue
            length = shapes[sl.param][sl.axis] * sl.groups
            units = runs_to_array(sl.index)
            if units.size != length:
                raise TraceError(f"internal: a slice index of {units.size} entries on an axis of {length}")
            cov = covered.setdefault(key, np.zeros(length, dtype=bool))
            cov |= units >= 0
    partial = {k: (int(c.sum()), c.size) for k, c in covered.items() if k not in full and not c.all()}
    if not partial:
        return groups
    out = []
    for g in groups:
        hits = [k for k in ((sl.param, sl.axis, sl.groups) for sl in g.slices) if k in partial]
        if hits:
            (p, ax, _), (have, n) = hits[0], partial[hits[0]]
            why = (f"Torch-Pruning coupled only {have} of the {n} entries of {p!r} axis {ax} to units (it couples "
                   "tensors of different widths element-wise, e.g. grouped-query attention), so its units are not "
                   "closed")
            g = dataclasses.replace(g, prunable=False, reason="; ".join(r for r in (g.reason, why) if r))
        out.append(g)
    return out

