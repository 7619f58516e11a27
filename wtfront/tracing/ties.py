"""Groups that share a tied tensor axis, made one.

A tied weight (`decoder.weight is word_embeddings.weight`) has one canonical name, so when its two uses fall
in two Torch-Pruning groups (BERT's MLM head: the decoder's inputs belong to `transform.dense`'s outputs, the
embedding's columns to the hidden width) the same tensor axis would sit in two unit groups: group lasso would
count those entries twice, and a mask of one group would zero entries of the other. Pruning one use prunes the
other, so the groups are one: this pass merges them, relabelling the second group's units through the shared
axis. Where the shared axis does not map the units one-to-one, no merge is sound and the groups are marked not
prunable, with the reason.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from wtcore.ir import Slice, Structure, UnitGroup, runs_from_list

__all__ = ["TIE_REASON", "merge_tied_groups"]

TIE_REASON = "shares the tied tensor axis {axis} of {param!r} with group {other!r}, whose units it cannot be mapped to"


def _relabel(s: Slice, perm: np.ndarray) -> Slice:
    ids = s.unit_ids()
    return replace(s, index=runs_from_list(np.where(ids >= 0, perm[np.maximum(ids, 0)], -1)))


def _mapping(a: Slice, b: Slice, size_a: int, size_b: int) -> np.ndarray | None:
    """perm[unit of b] = unit of a, when the shared axis maps b's units one-to-one onto a's, else None."""
    ia, ib = a.unit_ids(), b.unit_ids()
    if size_a != size_b or ia.shape != ib.shape or not np.array_equal(ia >= 0, ib >= 0):
        return None
    perm = np.full(size_b, -1, dtype=np.int64)
    on = ib >= 0
    perm[ib[on]] = ia[on]
    if (perm < 0).any() or not np.array_equal(perm[ib[on]], ia[on]) or len(set(perm.tolist())) != size_b:
        return None
    return perm


def _merge_into(base: UnitGroup, other: UnitGroup, perm: np.ndarray, order: dict[str, int]) -> UnitGroup | None:
    slices = {(s.param, s.axis): s for s in base.slices}
    for s in other.slices:
        r = _relabel(s, perm)
        have = slices.get((s.param, s.axis))
        if have is not None and have != r:  # both reach this axis: one index, where they agree
            ih, ir = have.unit_ids(), r.unit_ids()
            if (have.groups, have.group_axis, ih.shape) != (r.groups, r.group_axis, ir.shape):
                return None
            if ((ih >= 0) & (ir >= 0) & (ih != ir)).any():
                return None
            r = replace(have, index=runs_from_list(np.where(ih >= 0, ih, ir)))
        slices[s.param, s.axis] = r
    reason = "; ".join(dict.fromkeys(r for r in (base.reason, other.reason) if r))
    return replace(base, slices=tuple(sorted(slices.values(), key=lambda s: (order[s.param], s.axis))),
                   prunable=base.prunable and other.prunable, reason=reason)


def _refuse(g: UnitGroup, why: str) -> UnitGroup:
    reasons = [r for r in g.reason.split("; ") if r]
    return replace(g, prunable=False, reason="; ".join(reasons if why in reasons else [*reasons, why]))


def merge_tied_groups(structure: Structure) -> Structure:
    """`structure` with every pair of groups that share entries of a tied (aliased) parameter's axis merged (or
    marked not prunable). Groups meeting on disjoint entries of an axis (a concatenation) stay apart."""
    order = {p.name: i for i, p in enumerate(structure.params)}
    tied = {p.name for p in structure.params if p.aliases}
    if not tied:
        return structure
    groups = list(structure.groups)
    merged_one = True
    while merged_one:  # a merge changes the owners of axes: scan again until no group shares an axis
        merged_one = False
        owner: dict[tuple[str, int], int] = {}
        for gi, g in enumerate(groups):
            for s in g.slices:
                if s.param not in tied:
                    continue
                first = owner.setdefault((s.param, s.axis), gi)
                if first == gi:
                    continue
                base = groups[first]
                a = next(x for x in base.slices if (x.param, x.axis) == (s.param, s.axis))
                if not ((a.unit_ids() >= 0) & (s.unit_ids() >= 0)).any():  # disjoint entries (a concatenation)
                    continue
                perm = _mapping(a, s, base.size, g.size)
                merged = _merge_into(base, g, perm, order) if perm is not None else None
                if merged is not None:
                    groups[first] = merged
                    del groups[gi]
                    merged_one = True
                    break
                groups[first] = _refuse(base, TIE_REASON.format(axis=s.axis, param=s.param, other=g.name))
                groups[gi] = g = _refuse(g, TIE_REASON.format(axis=s.axis, param=s.param, other=base.name))
            if merged_one:
                break
    return replace(structure, groups=tuple(groups))
