"""Property-testing helpers: hypothesis strategies for random structures and parameters, and a slow,
obviously correct float64 reference for per-unit reductions.

Users test their own specs the way wt tests its own:

    from hypothesis import given
    from wtcore.testing import structures_and_params, reference_unit_values

    @given(structures_and_params())
    def test_my_spec(case):
        structure, params = case
        out = wtcore.compile(structure, ["my_spec"])(params)["my_spec"]
        ref = ...  # computed from reference_unit_values(structure, params)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .compiler import select_slices
from .ir import AxisPart, CostAxis, CostOp, Param, Slice, Structure, UnitGroup, runs_from_list

try:  # hypothesis is a test-time dependency
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

__all__ = [
    "element_unit_maps",
    "params_for",
    "reference_unit_cost",
    "reference_unit_values",
    "structures",
    "structures_and_params",
    "structures_with_ops",
    "zero_units",
]


# ----------------------------------------------------------------------------- reference
def _element_map(s: Slice, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """Global unit id (or -1) of every element of the parameter, broadcast to its full shape."""
    idx = np.asarray(s.index_list(), dtype=np.int64)
    glob = np.where(idx >= 0, idx + offset, -1)
    if s.groups == 1:
        view = [1] * len(shape)
        view[s.axis] = shape[s.axis]
        return np.broadcast_to(glob.reshape(view), shape)
    n_g = shape[s.group_axis] // s.groups
    table = np.empty((shape[s.group_axis], shape[s.axis]), dtype=np.int64)
    for o in range(shape[s.group_axis]):  # plain loops: this is the reference
        for j in range(shape[s.axis]):
            table[o, j] = glob[(o // n_g) * shape[s.axis] + j]
    a, b = s.group_axis, s.axis
    view = [1] * len(shape)
    view[a], view[b] = shape[a], shape[b]
    t = table if a < b else table.T
    return np.broadcast_to(t.reshape(view), shape)


def element_unit_maps(
    structure: Structure, include: Iterable[str] | None = None, ignore: Iterable[str] | None = None
) -> dict[str, list[np.ndarray]]:
    """Per parameter, one full-shape map of global unit ids per (filtered) slice."""
    kept = select_slices(structure, include, ignore)
    out: dict[str, list[np.ndarray]] = {}
    for g in structure.groups:
        for s in kept[g.name]:
            shape = structure.param_map[s.param].shape
            out.setdefault(s.param, []).append(_element_map(s, shape, structure.offsets[g.name]))
    return out


def reference_element_sums(structure: Structure, per_unit: np.ndarray) -> dict[str, np.ndarray]:
    """Per parameter element, the sum of `per_unit` over the *distinct* units its slices give it (float64 loops);
    the reference for anything that spreads a per-unit coefficient back onto the weights."""
    ext = np.concatenate([np.asarray(per_unit, dtype=np.float64), [0.0]])
    out = {}
    for name, maps in element_unit_maps(structure).items():
        coef = np.zeros(structure.param_map[name].shape)
        for i, m in enumerate(maps):
            fresh = m >= 0
            for prev in maps[:i]:
                fresh = fresh & (m != prev)
            coef += np.where(fresh, ext[np.where(m >= 0, m, len(per_unit))], 0.0)
        out[name] = coef
    return out


def reference_unit_values(
    structure: Structure,
    params: Mapping[str, torch.Tensor],
    include: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    tolerance: float = 0.0,
) -> dict[str, np.ndarray]:
    """float64 per-unit `sumsq`, `abssum`, `nnz` and `count`, by loops over parameters and their slices.

    Every element contributes once to each *distinct* unit among the units its slices give it.
    """
    n = structure.num_units
    acc = {k: np.zeros(n, dtype=np.float64) for k in ("sumsq", "abssum", "nnz", "count")}
    for name, maps in element_unit_maps(structure, include, ignore).items():
        w = params[name].detach().to(torch.float64).cpu().numpy()
        vals = {"sumsq": w * w, "abssum": np.abs(w), "nnz": (np.abs(w) > tolerance).astype(np.float64),
                "count": np.ones_like(w)}
        for i, m in enumerate(maps):
            fresh = m >= 0
            for prev in maps[:i]:
                fresh = fresh & (m != prev)  # already counted for this same unit by an earlier slice
            units = m[fresh]
            for k, v in vals.items():
                acc[k] += np.bincount(units, weights=v[fresh], minlength=n)[:n]
    return acc


def _axis_positions(structure: Structure, axis: CostAxis) -> list[int]:
    """Global unit of every position of a cost axis (-1 for none), written out position by position."""
    pos = [-1] * axis.size
    if axis.parts:
        for part in axis.parts:
            off = structure.offsets[part.group]
            for i, u in enumerate(part.index_list()):
                if u >= 0:
                    pos[i] = off + u
    elif axis.group is not None:
        g, off = structure.group_map[axis.group], structure.offsets[axis.group]
        for i in range(g.size * axis.scale):
            pos[i] = off + i // axis.scale
    return pos


def reference_unit_cost(structure: Structure, op_scale: list[float] | None = None) -> np.ndarray:
    """float64 MACs (times `op_scale[k]` for op k) removed by pruning each unit alone, by loops over ops, units
    and axes: an op keeps `macs * prod_a (1 - positions of u on axis a / size_a)` without unit u."""
    out = np.zeros(structure.num_units)
    for k, op in enumerate(structure.ops):
        positions = [_axis_positions(structure, a) for a in op.axes]
        for u in range(structure.num_units):
            keep = 1.0
            for a, pos in zip(op.axes, positions):
                keep *= 1.0 - sum(1 for p in pos if p == u) / max(a.size, 1)
            out[u] += op.macs * (1.0 if op_scale is None else op_scale[k]) * (1.0 - keep)
    return out


# ----------------------------------------------------------------------------- strategies
def _require_hypothesis() -> None:
    if st is None:  # pragma: no cover
        raise ImportError("wtcore.testing strategies need hypothesis: pip install hypothesis")


def structures(max_params: int = 5, max_groups: int = 4, max_dim: int = 6) -> st.SearchStrategy[Structure]:
    """Random structures: 1-D/2-D/4-D parameters, groups with identity, permuted, partial (-1), repeated
    (head-like), grouped-conv and self-overlapping (two axes of one parameter in one group) slices."""
    _require_hypothesis()

    @st.composite
    def build(draw: st.DrawFn) -> Structure:
        n_params = draw(st.integers(1, max_params))
        params = []
        for i in range(n_params):
            rank = draw(st.sampled_from([1, 2, 4]))
            shape = tuple(draw(st.integers(1, max_dim)) for _ in range(rank))
            if rank == 4:
                shape = (shape[0], shape[1], draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            params.append(Param(f"m{i}.w", shape, "float32", f"m{i}", "Toy"))
        n_groups = draw(st.integers(1, max_groups))
        used_axes: dict[str, set[int]] = {p.name: set() for p in params}
        groups = []
        for gi in range(n_groups):
            size = draw(st.integers(1, max_dim))
            slices: list[Slice] = []
            for p in params:
                for axis in range(min(len(p.shape), 2)):
                    if not draw(st.booleans()):
                        continue
                    grouped = False
                    if len(p.shape) == 4 and axis == 1 and p.shape[0] > 1:
                        divisors = [d for d in range(2, p.shape[0] + 1) if p.shape[0] % d == 0]
                        grouped = bool(divisors) and draw(st.booleans())
                    n_groups_conv = draw(st.sampled_from(divisors)) if grouped else 1
                    axes_after = used_axes[p.name] | {axis} | ({0} if grouped else set())
                    if len(axes_after) > 2 or any(s.param == p.name and s.axis == axis for s in slices):
                        continue
                    length = p.shape[axis] * n_groups_conv
                    pattern = draw(st.sampled_from(["identity", "random", "repeat"]))
                    if pattern == "identity":
                        idx = [i % size for i in range(length)]
                    elif pattern == "repeat":
                        r = draw(st.integers(1, 3))
                        idx = [(i // r) % size for i in range(length)]
                    else:
                        idx = draw(st.lists(st.integers(-1, size - 1), min_size=length, max_size=length))
                    used_axes[p.name] = axes_after
                    slices.append(Slice(p.name, axis, runs_from_list(idx), n_groups_conv, 0))
            prunable = draw(st.booleans()) or gi == 0
            groups.append(UnitGroup(f"g{gi}", "channel", size, tuple(slices), prunable))
        return Structure(tuple(params), tuple(groups), model="random")

    return build()


def params_for(
    structure: Structure, dtype: torch.dtype = torch.float64, seed: int = 0, zero_fraction: float = 0.3
) -> dict[str, torch.Tensor]:
    """Random parameters for a structure, with about `zero_fraction` of the units zeroed entirely."""
    gen = torch.Generator().manual_seed(seed)
    params = {p.name: torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in structure.params}
    n = structure.num_units
    dead = (torch.rand(n, generator=gen) < zero_fraction).nonzero().flatten().tolist()
    params = zero_units(structure, params, dead)
    return {k: v.to(dtype) for k, v in params.items()}


def zero_units(
    structure: Structure, params: Mapping[str, torch.Tensor], units: Iterable[int]
) -> dict[str, torch.Tensor]:
    """Copy of `params` with every element coupled to the given global units set to zero."""
    units = np.asarray(sorted(set(units)), dtype=np.int64)
    out = {k: v.detach().clone() for k, v in params.items()}
    if units.size == 0:
        return out
    for name, maps in element_unit_maps(structure).items():
        kill = np.zeros(structure.param_map[name].shape, dtype=bool)
        for m in maps:
            kill |= np.isin(m, units)
        out[name][torch.from_numpy(kill)] = 0
    return out


def structures_and_params(
    dtype: torch.dtype = torch.float64, **kwargs: int
) -> st.SearchStrategy[tuple[Structure, dict[str, torch.Tensor]]]:
    """Pairs of a random structure and random parameters for it (some units exactly zero)."""
    _require_hypothesis()
    return st.tuples(structures(**kwargs), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3, 1.0])).map(
        lambda t: (t[0], params_for(t[0], dtype=dtype, seed=t[1], zero_fraction=t[2]))
    )


def structures_with_ops(max_ops: int = 3, **kwargs: int) -> st.SearchStrategy[Structure]:
    """Random structures (as `structures`) with random cost ops: one or two axes each, coarse (a group's units
    times a scale, possibly with static padding), exact (a per-position unit list with -1s) or static."""
    _require_hypothesis()

    @st.composite
    def build(draw: st.DrawFn) -> Structure:
        s = draw(structures(**kwargs))
        ops = []
        for k in range(draw(st.integers(1, max_ops))):
            axes = []
            for a in range(draw(st.integers(1, 2))):
                form = draw(st.sampled_from(["coarse", "exact", "static"]))
                g = draw(st.sampled_from(s.groups))
                if form == "coarse":
                    scale = draw(st.integers(1, 3))
                    axes.append(CostAxis(f"a{a}", g.size * scale + draw(st.integers(0, 2)), g.name, scale))
                elif form == "exact":
                    length = draw(st.integers(1, 8))
                    idx = draw(st.lists(st.integers(-1, g.size - 1), min_size=length, max_size=length))
                    axes.append(CostAxis(f"a{a}", length, parts=(AxisPart(g.name, runs_from_list(idx)),)))
                else:
                    axes.append(CostAxis(f"a{a}", draw(st.integers(1, 6))))
            ops.append(CostOp(f"op{k}", f"op{k}", "linear", draw(st.integers(0, 10**6)), tuple(axes)))
        return Structure(s.params, s.groups, tuple(ops), model="random")

    return build()
