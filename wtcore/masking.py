"""Eager helpers for masks over canonical units: amount validation, per-unit vectors from user data, the
element mask of every parameter implied by a unit mask, and the parameter shapes after physical pruning.

These are plain functions of the IR (and small tensors), shared by the mask specs (`wtcore.specs.masks`,
which lower the same index arithmetic into programs) and by the front end (fake and physical pruning).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import SpecError, StructureError
from .ir import Slice, Structure

__all__ = [
    "as_unit_vector",
    "keep_from_removed",
    "param_masks",
    "pruned_shapes",
    "removed_by_group",
    "slice_lookup",
    "validate_amount",
]


def validate_amount(amount: Any, what: str = "amount") -> int | float:
    """Check `amount` the way `torch.nn.utils.prune` does: an int is a count (>= 0), a float a fraction in
    [0, 1]. Returns it as int or float. (Unlike torch, a bool is rejected: `True` is almost surely a bug.)"""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise SpecError(f"{what} must be an int (a count) or a float in [0, 1] (a fraction), got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise SpecError(f"{what}={amount} should either be a float in the range [0, 1] or a non-negative integer")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise SpecError(f"{what}={amount} should either be a float in the range [0, 1] or a non-negative integer")
    return float(amount)


def count_to_prune(amount: int | float, size: int) -> int:
    """torch.nn.utils.prune's `_compute_nparams_toprune`: the count itself, or round(fraction * size)
    (Python's round: half to even)."""
    return amount if isinstance(amount, int) else round(amount * size)


def as_unit_vector(
    structure: Structure, values: torch.Tensor | Mapping[str, Sequence[Any]] | Sequence[tuple[str, Sequence[Any]]],
    dtype: torch.dtype = torch.float64, fill: Any = 0, what: str = "values",
) -> torch.Tensor:
    """A `[num_units]` tensor from a global vector, or from per-group sequences (`{group: [v0, v1, ...]}` or
    the same as `(group, values)` pairs); groups not given are filled with `fill`."""
    n = structure.num_units
    if isinstance(values, torch.Tensor):
        if values.shape != (n,):
            raise SpecError(f"{what} must have shape [{n}] (one entry per unit), got {tuple(values.shape)}")
        return values.detach().to("cpu", dtype)
    items = values.items() if isinstance(values, Mapping) else values
    out = torch.full((n,), fill, dtype=dtype)
    for name, vals in items:
        if name not in structure.group_map:
            raise SpecError(f"{what}: unknown unit group {name!r}")
        g = structure.group_map[name]
        t = torch.as_tensor(vals, dtype=dtype).reshape(-1)
        if t.numel() != g.size:
            raise SpecError(f"{what}: group {name!r} has {g.size} units, got {t.numel()} values")
        off = structure.offsets[name]
        out[off: off + g.size] = t
    return out


def slice_lookup(s: Slice, shape: tuple[int, ...], offset: int, sentinel: int) -> tuple[torch.Tensor, list[int]]:
    """(index, view): global unit id of each entry of the slice (`sentinel` for entries of no unit), laid out
    so that `index.reshape(view)` broadcasts against the parameter. A grouped slice yields a 2-D table over
    (group_axis, axis); a plain one a vector along `axis`."""
    table = s.unit_table(shape, offset, sentinel)
    return torch.from_numpy(table.reshape(-1)), list(table.shape)


def param_masks(
    structure: Structure, keep: torch.Tensor, params: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Element keep-masks implied by a unit keep-mask: an element is kept unless one of its slices (in any
    group, regardless of include/ignore filters) maps it to a removed unit. Only parameters with at least
    one removed element are returned (a mask of all ones would only double the state)."""
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1).cpu()
    n = structure.num_units
    if keep.numel() != n:
        raise SpecError(f"unit mask has {keep.numel()} entries, the structure has {n} units")
    ext = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
    wanted = set(params) if params is not None else None
    out: dict[str, torch.Tensor] = {}
    for pname, items in _slices_by_param(structure).items():
        if wanted is not None and pname not in wanted:
            continue
        shape = structure.param_map[pname].shape
        m: torch.Tensor | None = None
        for s, off in items:
            idx, view = slice_lookup(s, shape, off, n)
            v = ext[idx].reshape(view)
            m = v if m is None else m & v
        assert m is not None
        if not bool(m.all()):
            out[pname] = m.expand(shape).clone()
    return out


def _slices_by_param(structure: Structure) -> dict[str, list[tuple[Slice, int]]]:
    out: dict[str, list[tuple[Slice, int]]] = {}
    for g in structure.groups:
        for s in g.slices:
            out.setdefault(s.param, []).append((s, structure.offsets[g.name]))
    return out


def removed_by_group(structure: Structure, keep: torch.Tensor) -> dict[str, list[int]]:
    """Unit indices (within their group) that a keep-mask removes, for groups that lose any."""
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1).cpu()
    out: dict[str, list[int]] = {}
    for g in structure.groups:
        off = structure.offsets[g.name]
        gone = (~keep[off: off + g.size]).nonzero().flatten().tolist()
        if gone:
            out[g.name] = gone
    return out


def keep_from_removed(structure: Structure, removed: Mapping[str, Iterable[int]]) -> torch.Tensor:
    """A `[num_units]` keep-mask from `{group: unit indices to remove}`."""
    keep = torch.ones(structure.num_units, dtype=torch.bool)
    for name, units in removed.items():
        if name not in structure.group_map:
            raise StructureError(f"unknown unit group {name!r}")
        g = structure.group_map[name]
        idx = sorted({int(u) for u in units})
        if idx and not (0 <= idx[0] and idx[-1] < g.size):
            raise StructureError(f"group {name!r} has units 0..{g.size - 1}; cannot remove {idx}")
        off = structure.offsets[name]
        keep[[off + u for u in idx]] = False
    return keep


def pruned_shapes(structure: Structure, keep: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter after physically removing the units a keep-mask drops.

    Along each sliced axis an entry goes when any slice maps it to a removed unit; a grouped axis (whose
    index runs over all `groups * shape[axis]` channels) shrinks by the removed channels over `groups`.
    """
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1).cpu()
    n = structure.num_units
    ext = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
    gone: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}
    for pname, items in _slices_by_param(structure).items():
        for s, off in items:
            removed = ~ext[torch.from_numpy(s.unit_ids(off, n))]
            key = (pname, s.axis)
            prev = gone.get(key)
            gone[key] = ((prev[0] | removed) if prev is not None else removed, s.groups)
    out = {p.name: p.shape for p in structure.params}
    for (pname, axis), (removed, groups) in gone.items():
        shape = list(out[pname])
        total = int(removed.numel() - removed.sum())
        shape[axis] = total // groups
        out[pname] = tuple(shape)
    return out
