"""The default pruning policy: one definition for `wt prune`, the `Controller`, `solve_keep` and the mask specs.

A single global ranking of raw norms prunes badly: a unit's L2 norm grows with the number of elements it
couples (an attention head couples tens of thousands, an MLP feature a few hundred) and with its layer's
initialization scale, so raw scores compare layers, not units. Torch-Pruning normalizes scores when it ranks
globally; wt does the same by default, and bounds what any group can lose:

- `normalize="mean"`: before a global (or isomorphic) ranking, each unit's score is divided by the mean
  score of the live units of its group, so a unit ranks by how it compares to its siblings, and a head
  competes with an MLP feature on the same footing (both groups average 1). Groups whose mean is 0 keep
  their raw scores. `None` ranks raw scores.
- `max_fraction`: with a global or isomorphic scope a group loses at most `DEFAULT_MAX_FRACTION` of its
  units (a local scope removes the same fraction everywhere, so it is uncapped, as in torch).
- `round_to`: the units a group keeps are rounded up to a multiple (1: no rounding).
- A group left with fewer than `MIN_WIDTH_FRACTION` of its original width raises a `NarrowGroupWarning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from .errors import SpecError
from .ir import Structure

__all__ = [
    "DEFAULT_MAX_FRACTION",
    "DEFAULT_NORMALIZE",
    "DEFAULT_SCOPE",
    "MIN_WIDTH_FRACTION",
    "NORMALIZERS",
    "NarrowGroupWarning",
    "default_max_fraction",
    "narrow_groups",
    "normalize_scores",
    "warn_narrow",
]

DEFAULT_SCOPE = "global"
DEFAULT_NORMALIZE = "mean"
DEFAULT_MAX_FRACTION = 0.9
MIN_WIDTH_FRACTION = 0.1
NORMALIZERS = (None, "mean")


class NarrowGroupWarning(UserWarning):
    """A pruning decision leaves a unit group below `MIN_WIDTH_FRACTION` of its original width."""


def default_max_fraction(scope: str) -> float:
    """The cap on the fraction of a group's units a mask may remove when none is given."""
    return 1.0 if scope == "local" else DEFAULT_MAX_FRACTION


def check_normalize(normalize: object, what: str) -> str | None:
    if normalize not in NORMALIZERS:
        raise SpecError(f"{what}: normalize must be one of {NORMALIZERS}, got {normalize!r}")
    return normalize  # type: ignore[return-value]


def normalize_scores(scores: np.ndarray, gid: np.ndarray, counted: np.ndarray, normalize: str | None) -> np.ndarray:
    """Scores divided by the mean over the `counted` units of their group (`gid` per unit; infinite scores are
    not counted); unchanged where the mean is not positive or `normalize` is None."""
    if normalize is None:
        return scores
    counted = counted & np.isfinite(scores)
    n_groups = int(gid.max()) + 1 if gid.size else 0
    total = np.bincount(gid, weights=np.where(counted, scores, 0.0), minlength=n_groups)
    count = np.bincount(gid, weights=counted.astype(np.float64), minlength=n_groups)
    mean = (total / np.maximum(count, 1.0))[gid]
    return np.where(mean > 0, scores / np.where(mean > 0, mean, 1.0), scores)


def narrow_groups(
    structure: Structure, keep: Sequence[bool] | np.ndarray, floor: float = MIN_WIDTH_FRACTION
) -> list[tuple[str, int, int]]:
    """`(group, kept, original width)` of every prunable group that `keep` leaves below `floor` x its
    original (baseline) width; groups the mask does not touch are not reported."""
    k = np.asarray(keep, dtype=bool)
    out = []
    for g in structure.groups:
        off = structure.offsets[g.name]
        kept = int(k[off : off + g.size].sum())
        base = g.baseline_size or g.size
        if g.prunable and kept < g.size and kept < math.ceil(floor * base - 1e-9):
            out.append((g.name, kept, base))
    return out


def warn_narrow(
    structure: Structure, keep: Sequence[bool] | np.ndarray, floor: float = MIN_WIDTH_FRACTION, stacklevel: int = 3
) -> list[tuple[str, int, int]]:
    """`narrow_groups`, with one `NarrowGroupWarning` listing them (if any)."""
    narrow = narrow_groups(structure, keep, floor)
    if narrow:
        shown = ", ".join(f"{n} {k}/{b}" for n, k, b in narrow[:8]) + (" ..." if len(narrow) > 8 else "")
        warnings.warn(
            f"{len(narrow)} unit group(s) keep less than {floor:.0%} of their width ({shown}); lower "
            "max_fraction, use normalize='mean', or exclude them with groups=",
            NarrowGroupWarning,
            stacklevel=stacklevel,
        )
    return narrow
