"""Which units have collapsed: a threshold from the gap in the distribution of size-normalized unit norms.

Group lasso pulls whole units toward zero, but rarely to exactly zero: with Adam, collapsed units hover a few
decades below the living ones, at a height set by the learning rate, and some are still on their way down.
A fixed threshold on the raw L2 norm misses them (and a unit's L2 norm grows with the number of its
elements). Here each unit's norm is divided by the square root of its element count (its RMS element), and
the log10 values of one checkpoint are split in two by Otsu's method (the split that maximizes the variance
between the two classes). The split counts as a collapse when the classes' means are at least
`MIN_SEPARATION` decades apart and the split explains at least `MIN_EXPLAINED` of the variance (a unimodal
distribution explains at most about 0.75); the threshold is the geometric middle of the two values on either
side of the split, taken from the checkpoint whose classes are furthest apart. Before any collapse, the units
of different layers form clusters a fraction of a decade apart, which neither criterion accepts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import wtcore
from wtcore.ir import Structure
from wtcore.masking import param_masks

__all__ = ["MIN_EXPLAINED", "MIN_SEPARATION", "Gap", "collapsed_keep", "find_gap", "macs_ratio_without",
           "unit_sizes"]

#: decades between the mean log10 norms of the collapsed and the living units (1: a factor of 10)
MIN_SEPARATION = 1.0
#: the fraction of the log10 norms' variance the split must explain (Otsu's effectiveness measure)
MIN_EXPLAINED = 0.8


@dataclass(frozen=True)
class Gap:
    """The split: `below` and `above` are the normalized norms on either side, `threshold` their geometric mean,
    `separation` the decades between the two classes' mean log10 norms, `explained` the fraction of variance
    the split explains, `checkpoint` the index of the checkpoint it was found in, `units_below` how many of its
    units (exact zeros included) lie below."""

    threshold: float
    below: float
    above: float
    separation: float
    explained: float
    checkpoint: int
    units_below: int


def unit_sizes(structure: Structure) -> torch.Tensor:
    """Elements coupled to each unit, `[num_units]` float64: the squared `unit_l2` of all-ones parameters."""
    ones = {p.name: torch.ones(p.shape) for p in structure.params}
    with torch.no_grad():
        l2 = wtcore.compile(structure, ["unit_l2"])(ones)["unit_l2"]
    return l2.to(torch.float64).square().round()


def otsu_split(logs: torch.Tensor) -> tuple[int, float, float]:
    """For sorted values: (i, separation, explained) of the split into `logs[:i]`, `logs[i:]` with the largest
    between-class variance."""
    n = logs.numel()
    csum = torch.cumsum(logs, 0)
    i = torch.arange(1, n, dtype=torch.float64)
    mean_lo = csum[:-1] / i
    mean_hi = (csum[-1] - csum[:-1]) / (n - i)
    between = (i / n) * ((n - i) / n) * (mean_hi - mean_lo) ** 2
    k = int(between.argmax())
    total = float(logs.var(unbiased=False))
    explained = float(between[k]) / total if total > 0 else 0.0
    return k + 1, float(mean_hi[k] - mean_lo[k]), explained


def find_gap(normalized: Sequence[torch.Tensor], min_separation: float = MIN_SEPARATION,
             min_explained: float = MIN_EXPLAINED) -> Gap | None:
    """The split of the nonzero normalized norms (exact zeros are collapsed already and left out) of the
    checkpoint whose two classes are furthest apart, among those that pass both criteria; None if none does."""
    best: Gap | None = None
    for k, v in enumerate(normalized):
        nz = torch.sort(v[v > 0].to(torch.float64)).values
        if nz.numel() < 2:
            continue
        i, separation, explained = otsu_split(nz.log10())
        if separation < min_separation or explained < min_explained:
            continue
        if best is None or separation > best.separation:
            lo, hi = float(nz[i - 1]), float(nz[i])
            best = Gap(math.sqrt(lo * hi), lo, hi, separation, explained, k, i + int((v == 0).sum()))
    return best


def collapsed_keep(structure: Structure, prunable: torch.Tensor, normalized: torch.Tensor,
                   threshold: float | None) -> torch.Tensor:
    """The `[num_units]` keep-mask without the collapsed units (normalized norm <= threshold, or exactly zero)
    of prunable groups; a group whose units all collapsed keeps its largest, as physical pruning would."""
    keep = torch.ones(structure.num_units, dtype=torch.bool)
    gone = normalized == 0 if threshold is None else normalized <= threshold
    idx = prunable.nonzero().flatten()
    keep[idx[gone]] = False
    full = torch.full((structure.num_units,), -1.0, dtype=torch.float64)
    full[idx] = normalized
    start = 0
    for g in structure.groups:
        sl = slice(start, start + g.size)
        if g.prunable and g.size and not bool(keep[sl].any()):
            keep[start + int(full[sl].argmax())] = True
        start += g.size
    return keep


def macs_ratio_without(structure: Structure, keep: torch.Tensor) -> float:
    """Active MACs / MACs of the unpruned model once the units not in `keep` are gone (a function of the mask
    alone: the MACs of all-ones parameters with those units zeroed)."""
    masks = param_masks(structure, keep)
    params = {p.name: masks[p.name].to(torch.float32) if p.name in masks else torch.ones(p.shape)
              for p in structure.params}
    with torch.no_grad():
        return float(wtcore.compile(structure, ["active_macs"])(params)["active_macs/ratio"])
