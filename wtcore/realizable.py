"""What physical pruning can carry out: one definition for the structured mask specs and the solver.

A keep-mask is *realizable* when `prune_units` removes exactly its units and the output equals the masked
model's. Two rules make it so, read from the IR alone:

- **ties** (`unit_ties`): a grouped (not depthwise) convolution shares one weight across its conv groups, so
  Torch-Pruning keeps the same in-group positions in every group; units tied that way go together. A tie is
  scored by its members' mean (`tie_mean`) and removed only whole (`whole_ties`);
- **eligibility** (`eligible_groups`, `group_caps`): only prunable groups lose units, groups whose units a
  normalization mixes (`UnitGroup.lossy`) only when asked (`lossy=True`), and a group keeps `min_kept` units
  (two per conv group of a grouped convolution, one elsewhere).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SpecError
from .ir import Structure
from .lang import Var
from .primitives import segment_sum_sorted
from .spec import Context

__all__ = [
    "TieProgram",
    "Ties",
    "eligible_groups",
    "group_caps",
    "min_kept",
    "tie_mean",
    "ties_of",
    "unit_ties",
    "whole_ties",
]


def unit_ties(structure: Structure) -> torch.Tensor:
    """For every unit, the smallest unit it must be removed with, `[num_units]` int64 (itself when free).

    Physical pruning of a grouped (not depthwise) convolution keeps the *same* in-group positions in every
    conv group (Torch-Pruning slices one weight shared by all groups): its input channels `g * per_group + j`
    of every group `g` go together, and so, to keep the groups equal in size, do its output channels. Units
    tied this way are ranked and removed as one (a structured mask removes a tie only when all of it is
    selected), so every mask is one that physical pruning carries out with the same output.
    """
    n = structure.num_units
    parent = np.arange(n)

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = int(parent[u])
        return u

    def tie(ids: np.ndarray, blocks: int) -> None:
        cols = ids.reshape(blocks, -1)
        for j in range(cols.shape[1]):
            us = [int(u) for u in cols[:, j] if u >= 0]
            for u in us[1:]:
                a, b = find(us[0]), find(u)
                if a != b:
                    parent[max(a, b)] = min(a, b)

    grouped = _grouped_weights(structure)
    for g in structure.groups:
        off = structure.offsets[g.name]
        for s in g.slices:
            if s.param not in grouped:
                continue
            blocks, gaxis = grouped[s.param]
            ids = s.unit_ids(off, -1)
            if s.groups > 1 or s.axis == gaxis:  # an input slice (over the full input count) or the output rows
                tie(ids, blocks)
    roots = np.array([find(u) for u in range(n)], dtype=np.int64)
    return torch.from_numpy(roots)


def _grouped_weights(structure: Structure) -> dict[str, tuple[int, int]]:
    """weight -> (conv groups, axis the groups split), for grouped convolutions that are not depthwise."""
    return {
        s.param: (s.groups, s.group_axis)
        for g in structure.groups
        for s in g.slices
        if s.groups > 1 and structure.param_map[s.param].shape[s.group_axis] != s.groups
    }


def min_kept(structure: Structure) -> dict[str, int]:
    """The fewest units a structured mask leaves in a group, for groups where that is more than one: two
    output channels per conv group of a grouped convolution (one per group would make it depthwise-shaped,
    `groups == out_channels`, which Torch-Pruning then couples as a depthwise conv)."""
    grouped = _grouped_weights(structure)
    out: dict[str, int] = {}
    for g in structure.groups:
        for s in g.slices:
            if s.param in grouped and s.groups == 1 and s.axis == grouped[s.param][1]:
                out[g.name] = max(out.get(g.name, 1), 2 * grouped[s.param][0])
    return out


@dataclass(frozen=True)
class Ties:
    """`unit_ties` as segments: `order` sorts the units by tie (stably), tie `k` is `order[ends[k-1]:ends[k]]`
    (`sizes[k]` units); `seg` is each unit's tie, `position` its place in `order` (the tie-break that keeps
    tied units next to each other in a ranking)."""

    order: torch.Tensor
    ends: torch.Tensor
    sizes: torch.Tensor
    seg: torch.Tensor
    position: torch.Tensor

    @property
    def any(self) -> bool:
        """Whether some unit is tied to another."""
        return bool((self.sizes > 1).any())

    @property
    def tied(self) -> torch.Tensor:
        """`[num_units]` bool: the unit shares its tie with another."""
        return self.sizes[self.seg] > 1


def ties_of(structure: Structure) -> Ties:
    """`unit_ties(structure)` as `Ties` segments."""
    roots = unit_ties(structure)
    _, seg, sizes = torch.unique(roots, return_inverse=True, return_counts=True)
    order = torch.argsort(roots, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return Ties(order, torch.cumsum(sizes, 0), sizes, seg, position)


def tie_mean(score: torch.Tensor, ties: Ties) -> torch.Tensor:
    """float64 scores with each tied unit scored by its tie's mean: the operations the mask specs' programs
    run (one cumulative sum in tie order), so both rank equal scores alike."""
    s = score.to(torch.float64)
    total = segment_sum_sorted(s.index_select(0, ties.order), ties.ends)
    mean = (total / ties.sizes.to(torch.float64)).index_select(0, ties.seg)
    return torch.where(ties.tied, mean, s)


class TieProgram:
    """`ties_of` as the constants of one program, and `tie_mean` / `whole_ties` as its operations (for specs)."""

    def __init__(self, ctx: Context) -> None:
        self.b = ctx.b
        ties = ties_of(ctx.structure)
        self.any = ties.any
        if not self.any:
            return
        b = self.b
        self.order = b.const(ties.order, "units by tie")
        self.ends = b.const(ties.ends, "tie ends")
        self.sizes = b.const(ties.sizes, "tie sizes")
        self.seg = b.const(ties.seg, "tie of unit")
        self.tied = b.const(ties.tied, "tied units")

    def shared_score(self, score: Var) -> Var:
        """`tie_mean`: each tied unit scored by its tie's mean (float64), free units by their own score."""
        b = self.b
        total = b.segment_sum_sorted(b.take(b.to_float64(score), self.order), self.ends)
        mean = b.take(b.div(total, b.to_float64(self.sizes)), self.seg)
        return b.where(self.tied, mean, b.to_float64(score))

    def whole(self, pruned: Var) -> Var:
        """`whole_ties`: a bool unit vector True only where the unit's whole tie is."""
        b = self.b
        hits = b.segment_sum_sorted(b.to_long(b.take(pruned, self.order)), self.ends)
        return b.take(b.eq(hits, self.sizes), self.seg)


def whole_ties(removed: np.ndarray, ties: Ties) -> np.ndarray:
    """`removed` where the unit's whole tie is removed (a tie cut by a count stays)."""
    seg = ties.seg.numpy()
    hits = np.bincount(seg, weights=removed.astype(np.float64), minlength=ties.sizes.numel())
    return (hits == ties.sizes.numpy())[seg]


def eligible_groups(
    structure: Structure, groups: Sequence[str] | None, what: str, *, lossy: bool = False, only: set[str] | None = None
) -> list[bool]:
    """Per group, whether a mask or the solver may remove its units: prunable, matched by the fnmatch
    patterns `groups` (None: all), in `only` (None: all), and not lossy unless `lossy`. Raises `SpecError`
    when `groups` matches nothing prunable, or every group it could prune is lossy."""
    if not isinstance(lossy, bool):
        raise SpecError(f"{what}: lossy must be a bool, got {lossy!r}")
    if groups is not None:
        matched = [g.name for g in structure.groups if any(fnmatch.fnmatchcase(g.name, p) for p in groups)]
        if not matched:
            raise SpecError(f"{what}: groups={groups!r} matches no unit group")
        unprunable = [n for n in matched if not structure.group_map[n].prunable]
        if len(unprunable) == len(matched):
            raise SpecError(
                f"{what}: groups={groups!r} matches only groups that are not prunable ({unprunable[:3]}: "
                f"{structure.group_map[unprunable[0]].reason}); masks never remove their units"
            )
    wanted = [
        g.prunable
        and (groups is None or any(fnmatch.fnmatchcase(g.name, p) for p in groups))
        and (only is None or g.name in only)
        for g in structure.groups
    ]
    eligible = [w and (lossy or not g.lossy) for g, w in zip(structure.groups, wanted)]
    if any(wanted) and not any(eligible):
        g = next(g for g, w in zip(structure.groups, wanted) if w)
        raise SpecError(
            f"{what}: every group it may prune is mixed by a normalization ({g.name!r}: {g.lossy}), so zeroing "
            "its units is not what removing them computes and physical pruning refuses them; pass lossy=True to "
            "prune them anyway (and prune_units(..., strict=False), which changes the output)"
        )
    return eligible


def group_caps(structure: Structure, eligible: Sequence[bool], max_fraction: float) -> list[int]:
    """Per group, the most units a mask may remove: `max_fraction` of the group (already-zero units count),
    leaving at least `min_kept` units; 0 for groups that are not eligible."""
    floor = min_kept(structure)
    return [
        max(0, min(math.floor(max_fraction * g.size + 1e-9), g.size - floor.get(g.name, 1))) if e else 0
        for g, e in zip(structure.groups, eligible)
    ]
