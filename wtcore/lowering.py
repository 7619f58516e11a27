"""Lowering of the `unit_reduce` macro: per-unit reductions over every slice, as dense per-parameter work.

A unit's value (sum of squares, sum of |w|, nonzero count, activity, element count) adds up contributions
from every slice coupled to it. Per parameter, the elementwise value is reduced densely to the axes its
slices use (row sums, column sums, grouped-conv blocks); the small per-slice vectors of all parameters are
concatenated and added into the `[num_units]` vector with ONE `scatter_add`, shared by every kind a
program asks for (the kinds become columns). Elements that two slices of the same group map to the same
unit (a parameter sliced twice) are counted once: the overlap cells are subtracted.

Fast paths, each one formulation of the same sums: 1-D parameters with one slice are concatenated and
handled by one elementwise op; conv/linear weights sliced on axes 0 and 1 share one `sumsq_pairs`
equation for their sums of squares; activity of such weights comes from the `nonzero_stats` counts that
zero counts and N:M share (`wtcore.nonzero`); element counts are a compile-time constant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import StructureError
from .ir import Slice, Structure
from .lang import Builder, Eqn, Graph, Var, toposort
from .nonzero import col_any, row_any

__all__ = ["lower_unit_reduce"]

RUNTIME_KINDS = ("sumsq", "abssum", "nnz", "active")

Kind = tuple[str, float]  # (kind, tolerance)


@dataclass
class _ParamPlan:
    """How one parameter is reduced: the axes its slices keep, its slices, and its overlap corrections."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]  # axes kept by the dense reduction (R's dims, ascending)
    slices: list[tuple[Slice, int]]  # (slice, group offset)
    corrections: list[tuple[np.ndarray, np.ndarray]]  # (flat positions in R, global unit ids) to subtract


def _reduced_table(s: Slice, plan: _ParamPlan, offset: int) -> np.ndarray:
    """Global unit id (or -1) of every cell of R, the parameter reduced to `plan.axes`."""
    t = s.unit_table(plan.shape, offset)
    t = t.reshape(tuple(t.shape[a] for a in plan.axes))
    return np.broadcast_to(t, tuple(plan.shape[a] for a in plan.axes))


def _plan(structure: Structure, slices: Mapping[str, tuple[Slice, ...]]) -> list[_ParamPlan]:
    by_param: dict[str, list[tuple[Slice, int, str]]] = {}
    for g in structure.groups:
        for s in slices[g.name]:
            by_param.setdefault(s.param, []).append((s, structure.offsets[g.name], g.name))
    plans = []
    for p in structure.params:
        items = by_param.get(p.name)
        if not items:
            continue
        axes = sorted({s.axis for s, _, _ in items} | {s.group_axis for s, _, _ in items if s.groups > 1})
        if len(axes) > 2:
            raise StructureError(
                f"parameter {p.name!r} is sliced on {len(axes)} axes {axes}; wt supports at most two per parameter"
            )
        plan = _ParamPlan(p.name, p.shape, tuple(axes), [], [])
        # elements that two slices of this parameter map to the same unit are counted once; only slices of
        # the same group can do that (unit ids of different groups are disjoint)
        shared = [g for g in {g for _, _, g in items} if sum(1 for _, _, g2 in items if g2 == g) > 1]
        earlier: dict[str, list[tuple[Slice, int]]] = {g: [] for g in shared}
        for s, off, gname in items:
            if gname not in earlier:
                plan.slices.append((s, off))
                continue
            dropped = False
            for prev, prev_off in earlier[gname]:
                found = _overlap(prev, prev_off, s, off, plan)
                if found is None:
                    continue
                pos, units, covers_all = found
                if covers_all:
                    dropped = True  # every element of this slice is already counted by an earlier one
                    break
                plan.corrections.append((pos, units))
            if not dropped:
                plan.slices.append((s, off))
                earlier[gname].append((s, off))
        plans.append(plan)
    return plans


def _overlap(a: Slice, a_off: int, b: Slice, b_off: int, plan: _ParamPlan
             ) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Cells of R that slices `a` and `b` map to the same unit: (flat positions, global unit ids, whether they
    are all of `b`'s cells), or None if there are none."""
    if a.groups == 1 and b.groups == 1 and len(plan.axes) == 2 and a.axis != b.axis:
        # rows of one axis and columns of the other: pair positions with equal units (no [O, I] table)
        ia, ib = a.unit_ids(), b.unit_ids()
        pa, pb = np.flatnonzero(ia >= 0), np.flatnonzero(ib >= 0)
        order = pb[np.argsort(ib[pb], kind="stable")]
        lo = np.searchsorted(ib[order], ia[pa], "left")
        hi = np.searchsorted(ib[order], ia[pa], "right")
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            return None
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)
        i, j = np.repeat(pa, counts), order[starts]
        n_cols = plan.shape[plan.axes[1]]
        flat = i * n_cols + j if a.axis == plan.axes[0] else j * n_cols + i
        covers_all = total == pb.size * plan.shape[a.axis]
        return flat.astype(np.int64), ib[j] + b_off, covers_all
    ua = _reduced_table(a, plan, a_off)
    ub = _reduced_table(b, plan, b_off)
    same = (ub == ua) & (ub >= 0)
    if not same.any():
        return None
    pos = np.flatnonzero(same)
    return pos, ub.reshape(-1)[pos], bool((same | (ub < 0)).all())


def _plain_pair(plan: _ParamPlan) -> bool:
    """One ungrouped slice on axis 0 and one on axis 1, no overlap (most conv/linear weights)."""
    return (plan.axes == (0, 1) and not plan.corrections
            and sorted((s.axis, s.groups) for s, _ in plan.slices) == [(0, 1), (1, 1)])


def _counted_active(plan: _ParamPlan) -> bool:
    """Activity from the weight's `nonzero_stats`: 2+ dims, ungrouped slices on axes 0 and/or 1."""
    return len(plan.shape) >= 2 and set(plan.axes) <= {0, 1} and all(s.groups == 1 for s, _ in plan.slices)


def _elementwise(b: Builder, kind: Kind, p: Var) -> Var:
    """The value each element contributes to its units, in the accumulation dtype."""
    name, tol = kind
    if name == "sumsq":
        return b.square(b.emit("acc", p))
    if name == "abssum":
        return b.abs(b.emit("acc", p))
    # nnz / active: a count of nonzeros is also > 0 exactly when something is active
    hit = b.emit("ne", p, 0) if tol == 0.0 else b.gt(b.abs(p), tol)
    return b.cast_like(hit, b.emit("acc", p))


def _pair_vectors(b: Builder, v: Var, plan: _ParamPlan, out: list[Var]) -> None:
    """Slice vectors of a parameter sliced on axes 0 and 1 (conv and linear weights) from its elementwise value
    `v` of shape `[O, I, *K]`, with only the reductions torch does fast: over a contiguous trailing block or
    over leading dims (reducing the short kernel dims first is much slower on CPU)."""
    o, i = plan.shape[0], plan.shape[1]
    k = math.prod(plan.shape[2:])
    flat = b.reshape(v, (o, i * k)) if len(plan.shape) != 2 else v

    def per_input(x: Var, lead: tuple[int, ...]) -> Var:  # [..., I*K] -> [..., I]
        return x if k == 1 else b.sum(b.reshape(x, (*lead, i, k)), (len(lead) + 1,))

    for s, _ in plan.slices:
        if s.axis == 0 and s.groups == 1:
            out.append(b.sum(flat, (1,)))
        elif s.axis == 1 and s.groups == 1:
            out.append(per_input(b.sum(flat, (0,)), ()))
        elif s.axis == 1 and s.group_axis == 0:
            blocks = b.sum(b.reshape(flat, (s.groups, o // s.groups, i * k)), (1,))  # [G, I*K]
            out.append(b.reshape(per_input(blocks, (s.groups,)), (-1,)))
        else:  # axis 0 grouped along axis 1: not produced by the front end, but kept exact
            r = b.sum(b.reshape(flat, (o, i, k)), (2,)) if k > 1 else flat
            rt = b.emit("permute", r, dims=(1, 0))
            out.append(b.reshape(b.sum(b.reshape(rt, (s.groups, i // s.groups, o)), (1,)), (-1,)))
    for pos, _ in plan.corrections:
        cells = b.take(b.reshape(v, (o * i, k)), b.const(torch.from_numpy(pos), "overlap_positions"))  # [n, K]
        out.append(b.emit("neg", b.sum(cells, (1,))))


def _reduced_vectors(b: Builder, v: Var, plan: _ParamPlan, out: list[Var]) -> None:
    """Slice vectors of any other parameter: reduce every axis the slices do not use, then per slice."""
    dims = tuple(d for d in range(len(plan.shape)) if d not in plan.axes and plan.shape[d] > 1)
    kept = tuple(plan.shape[a] for a in plan.axes)
    r = b.sum(v, dims) if dims else v
    if len(plan.shape) - len(dims) != len(kept):  # size-1 axes: dropped by a free reshape, not a sum
        r = b.reshape(r, kept)
    for s, _ in plan.slices:
        if len(plan.axes) == 1:
            out.append(r)
            continue
        pos = plan.axes.index(s.axis)
        if s.groups == 1:
            out.append(b.sum(r, (1 - pos,)))
            continue
        rt = r if pos == 1 else b.emit("permute", r, dims=(1, 0))  # [group_axis_len, axis_len]
        blocks = b.reshape(rt, (s.groups, plan.shape[s.group_axis] // s.groups, plan.shape[s.axis]))
        out.append(b.reshape(b.sum(blocks, (1,)), (-1,)))
    for pos, _ in plan.corrections:
        flat = b.reshape(r, (-1,))
        out.append(b.emit("neg", b.take(flat, b.const(torch.from_numpy(pos), "overlap_positions"))))


def _active_vectors(b: Builder, p: Var, plan: _ParamPlan, tolerance: float, out: list[Var]) -> None:
    """Per slice entry, 1 if its row/column has an element with |w| > tolerance (from the weight's
    `nonzero_stats`). Summed per unit by the scatter, the result is > 0 exactly for active units; overlap
    cells need no correction (counting a nonzero twice does not change > 0), so their entries are 0."""
    for s, _ in plan.slices:
        anys = row_any if s.axis == 0 else col_any
        out.append(b.emit("acc_like", anys(b, p, tolerance), p))
    for pos, _ in plan.corrections:
        zeros = b.const(torch.zeros(len(pos), dtype=torch.uint8), "no_correction")
        out.append(b.emit("acc_like", zeros, p))


def _scatter_order(plans: list[_ParamPlan]) -> tuple[list[_ParamPlan], int]:
    """Plans in the order their vectors are concatenated, and how many lead as concatenated 1-D parameters:
    1-D parameters with a single slice first (one elementwise op for all, when there are several), then the
    plain pairs (one `sumsq_pairs` equation), then the others."""
    flat = [pl for pl in plans if len(pl.shape) == 1 and len(pl.slices) == 1 and not pl.corrections]
    if len(flat) < 2:
        flat = []
    rest = [pl for pl in plans if not any(pl is f for f in flat)]
    return flat + [pl for pl in rest if _plain_pair(pl)] + [pl for pl in rest if not _plain_pair(pl)], len(flat)


def _unit_index(order: list[_ParamPlan], num_units: int) -> np.ndarray:
    """The scatter row of every vector entry, in `order`; entries of no unit go to the dump row `num_units`."""
    parts: list[np.ndarray] = []
    for pl in order:
        parts.extend(s.unit_ids(off, num_units) for s, off in pl.slices)
        parts.extend(units for _, units in pl.corrections)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _count_vector(plan: _ParamPlan) -> np.ndarray:
    """Elements per entry of each slice vector (and per overlap cell, negative), in the order the runtime kinds
    emit them: arithmetic on the shape, never a parameter-sized tensor."""
    numel = math.prod(plan.shape)
    parts = [np.full(plan.shape[s.axis] * s.groups, numel / (plan.shape[s.axis] * s.groups), dtype=np.float64)
             for s, _ in plan.slices]
    if plan.corrections:
        cell = numel / (plan.shape[plan.axes[0]] * plan.shape[plan.axes[1]])
        parts += [np.full(len(pos), -cell, dtype=np.float64) for pos, _ in plan.corrections]
    return np.concatenate(parts)


def _emit_scatter(b: Builder, order: list[_ParamPlan], n_flat: int, kinds: list[Kind], num_units: int,
                  index: np.ndarray) -> dict[Kind, Var]:
    """The dense reductions of the runtime `kinds` and ONE scatter; a `[num_units]` vector per kind."""
    if index.size == 0:
        zeros = b.const(torch.zeros(num_units, dtype=torch.float32), "zeros")
        return {k: zeros for k in kinds}
    vectors: dict[Kind, list[Var]] = {k: [] for k in kinds}
    if n_flat:  # 1-D parameters with a single slice: one elementwise op for all of them
        joined = b.cat(*[b.param(pl.name) for pl in order[:n_flat]])
        for k in kinds:
            vectors[k].append(_elementwise(b, k, joined))
    pairs = [pl for pl in order[n_flat:] if _plain_pair(pl)]
    if pairs and any(k[0] == "sumsq" for k in kinds):
        layouts = tuple((pl.shape[0], pl.shape[1], math.prod(pl.shape[2:]), pl.slices[0][0].axis == 0)
                        for pl in pairs)
        summed = b.emit("sumsq_pairs", *[b.param(pl.name) for pl in pairs], layouts=layouts)
        for k in kinds:
            if k[0] == "sumsq":
                vectors[k].append(summed)
    for pl in order[n_flat:]:
        p = b.param(pl.name)
        for k in kinds:
            if k[0] == "sumsq" and _plain_pair(pl):  # in `sumsq_pairs` above
                continue
            parts: list[Var] = []
            if k[0] == "active" and _counted_active(pl):
                _active_vectors(b, p, pl, k[1], parts)
            elif pl.axes == (0, 1):
                _pair_vectors(b, _elementwise(b, k, p), pl, parts)
            else:
                _reduced_vectors(b, _elementwise(b, k, p), pl, parts)
            # one small vector per parameter, joined once its elementwise temporary is freed: a large
            # temporary then leaves a hole the next one fits in (no fresh, page-faulting memory per call)
            vectors[k].append(b.cat(*parts))
    idx = b.const(torch.from_numpy(index), "unit_index")
    cols = [b.cat(*vectors[k]) for k in kinds]
    if len(cols) == 1:
        summed_units = b.emit("scatter_add", idx, cols[0], size=num_units + 1)
        return {kinds[0]: b.emit("narrow", summed_units, dim=0, start=0, length=num_units)}
    table = b.emit("scatter_add", idx, b.emit("stack", *cols, dim=1), size=num_units + 1)
    table = b.emit("narrow", table, dim=0, start=0, length=num_units)
    return {k: b.emit("select", table, dim=1, index=i) for i, k in enumerate(kinds)}


def _unit_counts(order: list[_ParamPlan], index: np.ndarray, num_units: int) -> torch.Tensor:
    """Distinct parameter elements per unit (float64), at compile time: the same scatter as the runtime
    kinds, of the constant per-entry element counts (overlap cells subtracted)."""
    if index.size == 0:
        return torch.zeros(num_units, dtype=torch.float64)
    weights = np.concatenate([_count_vector(pl) for pl in order])
    return torch.from_numpy(np.bincount(index, weights=weights, minlength=num_units + 1)[:num_units])


def _kind(e: Eqn) -> tuple[str, float]:
    kw = e.kwargs
    return kw["kind"], float(kw.get("tolerance", 0.0))


def lower_unit_reduce(g: Graph) -> None:
    """Replace every `unit_reduce` equation by its lowering. The lowering is emitted through the graph's
    memo, so it shares what specs emitted already (e.g. the `nonzero_stats` of a weight that zero counts read
    too); it is appended, and the order is then made topological again."""
    lazy = [e for e in g.eqns if e.prim == "unit_reduce"]
    if not lazy:
        return
    structure = g.structure
    assert structure is not None
    b = Builder(g)
    plans = _plan(structure, g.slices)
    order, n_flat = _scatter_order(plans)
    index = _unit_index(order, structure.num_units)
    requested = list(dict.fromkeys(_kind(e) for e in lazy))
    results: dict[Kind, Var] = {}
    runtime = [k for k in requested if k[0] in RUNTIME_KINDS]
    if runtime:
        results.update(_emit_scatter(b, order, n_flat, runtime, structure.num_units, index))
    for k in requested:
        if k[0] == "count":
            results[k] = b.const(_unit_counts(order, index, structure.num_units), "params_per_unit")
    replace = {e.out: results[_kind(e)] for e in lazy}
    g.eqns = [_substituted(e, replace) for e in g.eqns if e.prim != "unit_reduce"]
    g.outputs = [(k, replace.get(v, v)) for k, v in g.outputs]
    g.memo.clear()  # the memo may name replaced values; nothing emits through it after this pass
    toposort(g)


def _substituted(e: Eqn, replace: Mapping[Var, Var]) -> Eqn:
    if not any(v in replace for v in e.vars):
        return e
    inputs: tuple[Any, ...] = tuple(replace.get(a, a) if isinstance(a, Var) else a for a in e.inputs)
    return Eqn(e.out, e.prim, inputs, e.params)
