"""Which units have collapsed: a threshold from the gap in the distribution of size-normalized unit norms.

Group lasso pulls whole units toward zero, but rarely to exactly zero: collapsed units end a few decades
below the living ones, at a height that depends on the learning rate, the optimizer and the penalty. A
fixed threshold on the raw L2 norm misses them (and a unit's L2 norm grows with the number of its elements).
Here each unit's norm is divided by the square root of its element count (its RMS element), and the
threshold is put in the widest gap, on a log scale, of those values: the geometric middle of the gap, taken
from the checkpoint where the gap is widest. No gap of at least `MIN_GAP_DECADES` means nothing has
separated yet, and no threshold is suggested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import wtcore
from wtcore.ir import Structure
from wtcore.masking import param_masks

__all__ = ["MIN_GAP_DECADES", "Gap", "collapsed_keep", "find_gap", "macs_ratio_without", "unit_sizes"]

#: the narrowest gap (in decades of the normalized norm: 0.6 is a factor of 4) that counts as a separation
MIN_GAP_DECADES = 0.6


@dataclass(frozen=True)
class Gap:
    """The widest gap: `below` and `above` are the normalized norms on either side, `threshold` their geometric
    mean, `checkpoint` the index of the checkpoint it was found in, `units_below` how many units lie below."""

    threshold: float
    below: float
    above: float
    checkpoint: int
    units_below: int

    @property
    def decades(self) -> float:
        return math.log10(self.above / self.below)


def unit_sizes(structure: Structure) -> torch.Tensor:
    """Elements coupled to each unit, `[num_units]` float64: the squared `unit_l2` of all-ones parameters."""
    ones = {p.name: torch.ones(p.shape) for p in structure.params}
    with torch.no_grad():
        l2 = wtcore.compile(structure, ["unit_l2"])(ones)["unit_l2"]
    return l2.to(torch.float64).square().round()


def find_gap(normalized: Sequence[torch.Tensor], min_decades: float = MIN_GAP_DECADES) -> Gap | None:
    """The widest log-scale gap between consecutive nonzero normalized norms of any one checkpoint (exact zeros
    are collapsed already and left out), if at least `min_decades` wide."""
    best: Gap | None = None
    for k, v in enumerate(normalized):
        nz = torch.sort(v[v > 0].to(torch.float64)).values
        if nz.numel() < 2:
            continue
        logs = nz.log10()
        gaps = logs[1:] - logs[:-1]
        i = int(gaps.argmax())
        width = float(gaps[i])
        if width >= min_decades and (best is None or width > best.decades):
            lo, hi = float(nz[i]), float(nz[i + 1])
            best = Gap(math.sqrt(lo * hi), lo, hi, k, i + 1 + int((v == 0).sum()))
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
