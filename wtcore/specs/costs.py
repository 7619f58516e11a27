"""Cost specs: active MACs, structured and unstructured BOPs, compression, active parameters.

Every cost here is *linear in unit inactivity along each axis*: an axis of `L` positions whose entries map
to units keeps `L - sum(inactive units' positions)` positions. So per axis the program gathers the
inactive flags of a constant entry list (unit, multiplicity), multiplies by the multiplicities and sums
per axis with `segment_sum_sorted` (no scatter: the program's only `index_add` stays the unit reduction).
Per op, active MACs = MACs x product over its axes of (active / size) (1 MAC = one multiply-add).
All cost arithmetic is float64: per-op counts are exact integers up to 2**53.

"Inactive" means what physical pruning will remove (`removable_f64`): a zero unit of a group that is not
prunable (a zero-initialized classifier), or the last unit of a group, stays and keeps costing, so predicted
costs equal those of the physically pruned model.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SpecError, StructureError
from ..ir import CostAxis, Run, Structure, runs_length, runs_to_array
from ..lang import Var
from ..nonzero import total_count
from ..realizable import TieProgram
from ..spec import Context, define_spec

__all__ = ["WEIGHT_KINDS", "op_indices", "param_axes", "weight_params"]

#: Op kinds whose MACs are (uses of each weight element) x numel(weight).
WEIGHT_KINDS = frozenset({"conv", "grouped_conv", "depthwise_conv", "conv_transpose", "linear", "matmul"})


BOPS_OUTPUTS = {"per_op": "op", "total": "scalar", "baseline": "scalar", "compression": "scalar",
                "per_op_compression": "op"}


# ----------------------------------------------------------------------------- selections
def op_indices(ctx: Context, ops: Sequence[str] | None) -> list[int]:
    """Indices (into `structure.ops`) of the ops a cost spec counts: the named ones, or every op whose
    module or weight the compile filters keep."""
    s = ctx.structure
    if ops is not None:
        known = {o.name: i for i, o in enumerate(s.ops)}
        bad = [n for n in ops if n not in known]
        if bad:
            raise SpecError(f"unknown cost op(s) {bad[:5]}; ops look like {[o.name for o in s.ops[:3]]}")
        return sorted(known[n] for n in dict.fromkeys(ops))
    return [i for i, o in enumerate(s.ops) if ctx.selects(*(n for n in (o.module, o.param, o.name) if n))]


def weight_params(structure: Structure, kinds: frozenset[str] = WEIGHT_KINDS) -> list[str]:
    """Weights of the structure's weight ops (conv/linear/...), in parameter order; without cost ops
    (traced with costs=False), every parameter with two or more dimensions."""
    if not structure.ops:
        return [p.name for p in structure.params if len(p.shape) >= 2]
    used = {o.param for o in structure.ops if o.param and o.kind in kinds}
    return [p.name for p in structure.params if p.name in used]


def param_names(ctx: Context, params: Sequence[str] | None, default: list[str]) -> list[str]:
    s = ctx.structure
    if params is not None:
        bad = [n for n in params if n not in s.param_map]
        if bad:
            raise SpecError(f"unknown parameter(s) {bad[:5]}")
        return list(dict.fromkeys(params))
    return [n for n in default if ctx.selects(n, s.param_map[n].module)]


def bits_vector(structure: Structure, bits: Any, what: str) -> np.ndarray:
    """Bit widths per op of `structure.ops`: an int for all, or a sequence with one int per op."""
    n = len(structure.ops)
    vals = list(bits) if isinstance(bits, (tuple, list)) else [bits] * n
    if len(vals) != n:
        raise SpecError(f"{what}: got {len(vals)} bit widths for {n} cost ops; pass one int or one per op")
    for o, v in zip(structure.ops, vals):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise SpecError(f"{what} of op {o.name!r} must be a positive integer, got {v!r}")
    return np.asarray(vals, dtype=np.float64)


# ----------------------------------------------------------------------------- axis tables
@dataclass(frozen=True)
class AxisDesc:
    """An axis of `length` positions; `parts` are (group name, the run-encoded unit of every position, or None
    for the coarse form: every unit of the group `scale` times)."""

    length: int
    parts: tuple[tuple[str, tuple[Run, ...] | None, int], ...] = ()


def axis_desc(a: CostAxis) -> AxisDesc:
    if a.parts:
        return AxisDesc(a.size, tuple((p.group, p.index, 1) for p in a.parts))
    if a.group is not None:
        return AxisDesc(a.size, ((a.group, None, a.scale),))
    return AxisDesc(a.size)


def param_axes(structure: Structure, name: str) -> list[AxisDesc]:
    """The sliced axes of a parameter (all groups, ignoring filters: the physical layout)."""
    by_axis: dict[int, list] = {}
    for g in structure.groups:
        for s in g.slices:
            if s.param == name:
                by_axis.setdefault(s.axis, []).append((g.name, s.index, 1))
    return [AxisDesc(runs_length(parts[0][1]), tuple(parts)) for _, parts in sorted(by_axis.items())]


@dataclass
class AxisTable:
    """Cost axes as (unit, positions) entries: what a unit's inactivity removes from each axis."""

    units: torch.Tensor  # int64 [E]: global unit of each entry
    counts: torch.Tensor  # float64 [E]: positions of the axis mapped to that unit
    ends: torch.Tensor  # int64 [n_axes]: end of each axis' entries (every axis has >= 1 entry)
    lengths: torch.Tensor  # float64 [n_axes]
    dynamic: bool  # any entry with a nonzero count


def axis_table(structure: Structure, axes: Sequence[AxisDesc], what: Sequence[str]) -> AxisTable:
    units: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    ends: list[int] = []
    total = 0
    for ax, label in zip(axes, what):
        glob_all: list[np.ndarray] = []
        covered = np.zeros(ax.length, dtype=np.int64)
        for gname, index, scale in ax.parts:
            g = structure.group_map[gname]
            off = structure.offsets[gname]
            if index is None:
                glob_all.append(np.repeat(np.arange(g.size, dtype=np.int64) + off, scale))
                covered[: g.size * scale] += 1
                continue
            idx = runs_to_array(index)
            covered += idx >= 0
            glob_all.append(idx[idx >= 0] + off)
        if (covered > 1).any():
            raise StructureError(f"{label}: a position is coupled to units of two groups; costs need disjoint parts")
        glob = np.concatenate(glob_all) if glob_all else np.zeros(0, dtype=np.int64)
        u, c = np.unique(glob, return_counts=True)
        if u.size == 0:  # static axis: one entry that counts nothing keeps the segment non-empty
            u, c = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        units.append(u)
        counts.append(c)
        total += u.size
        ends.append(total)
    cnt = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    return AxisTable(
        torch.from_numpy(np.concatenate(units) if units else np.zeros(0, dtype=np.int64)),
        torch.from_numpy(cnt.astype(np.float64)),
        torch.tensor(ends, dtype=torch.long),
        torch.tensor([float(a.length) for a in axes], dtype=torch.float64),
        bool((cnt > 0).any()),
    )


def active_units(ctx: Context, tolerance: float) -> Var:
    """`unit_active`: active unless every coupled element has |w| <= tolerance (a unit with no coupled element
    after filters is active). Its per-weight activity comes from the `nonzero_stats` counts that the zero
    counts and N:M blocks of the sparsity specs read too (`wtcore.nonzero`)."""
    return ctx.dep("unit_active", tolerance=tolerance)


def inactive_f64(ctx: Context, tolerance: float) -> Var:
    """1.0 for every unit that is not active (every coupled element |w| <= tolerance), else 0.0."""
    b = ctx.b
    return b.to_float64(b.logical_not(active_units(ctx, tolerance)))


def removable_f64(ctx: Context, tolerance: float) -> Var:
    """1.0 for every inactive unit that physical pruning (`prune_zero_units`) removes, else 0.0: inactive units
    of prunable groups, except the first unit of a group whose units are all inactive (a layer keeps one), in
    whole grouped-conv ties (`wtcore.realizable`: a zero unit tied to a live one stays). Zero units of groups
    that are not prunable (a zero-initialized classifier) stay and still cost."""
    b, st = ctx.b, ctx.structure
    inactive = b.logical_and(b.logical_not(active_units(ctx, tolerance)), ctx.prunable_units())
    sizes = torch.tensor([g.size for g in st.groups], dtype=torch.long)
    all_gone = b.eq(b.segment_sum_sorted(b.to_long(inactive), ctx.group_ends()), b.const(sizes, "group_sizes"))
    first = torch.zeros(st.num_units, dtype=torch.bool)
    first[torch.cumsum(sizes, 0)[sizes > 0] - sizes[sizes > 0]] = True
    kept = b.logical_and(b.const(first, "first_unit_of_group"), b.take(all_gone, ctx.unit_group_ids()))
    out = b.logical_and(inactive, b.logical_not(kept))
    ties = TieProgram(ctx)
    return b.to_float64(ties.whole(out) if ties.any else out)


def axis_active(ctx: Context, axes: Sequence[AxisDesc], labels: Sequence[str], tolerance: float) -> Var:
    """Active positions of every axis, float64 `[len(axes)]`."""
    b = ctx.b
    t = axis_table(ctx.structure, axes, labels)
    lengths = b.const(t.lengths, "axis_lengths")
    if not t.dynamic or ctx.structure.num_units == 0:
        return lengths
    hit = b.mul(b.take(removable_f64(ctx, tolerance), b.const(t.units, "axis_units")), b.const(t.counts, "axis_counts"))
    return b.sub(lengths, b.segment_sum_sorted(hit, b.const(t.ends, "axis_ends")))


def ratio_products(ctx: Context, axes_of: Sequence[Sequence[AxisDesc]], labels: Sequence[str],
                   tolerance: float) -> Var:
    """Per item (op or parameter), the product over its axes of active / size, float64."""
    b = ctx.b
    flat = [a for axes in axes_of for a in axes]
    width = max((len(a) for a in axes_of), default=0)
    if width == 0 or not flat:
        return b.const(torch.ones(len(axes_of), dtype=torch.float64), "ones")
    flat_labels = [f"{lab} axis {k}" for lab, axes in zip(labels, axes_of) for k in range(len(axes))]
    ratio = b.div(axis_active(ctx, flat, flat_labels, tolerance),
                  b.const(torch.tensor([max(float(a.length), 1.0) for a in flat], dtype=torch.float64), "axis_sizes"))
    padded = b.cat(ratio, b.const(torch.ones(1, dtype=torch.float64), "one"))
    pad = len(flat)
    idx, k = [], 0
    for axes in axes_of:
        row = [k + j for j in range(len(axes))] + [pad] * (width - len(axes))
        idx.extend(row)
        k += len(axes)
    m = b.reshape(b.take(padded, b.const(torch.tensor(idx, dtype=torch.long), "op_axes")), (len(axes_of), width))
    out = b.emit("select", m, dim=1, index=0)
    for j in range(1, width):
        out = b.mul(out, b.emit("select", m, dim=1, index=j))
    return out


def _f64(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _safe_div(ctx: Context, num: Var, den: float) -> Var:
    return ctx.b.div(num, float(den) if den > 0 else 1.0)


# ----------------------------------------------------------------------------- MACs
def _active_macs_per_op(ctx: Context, idx: list[int], tolerance: float) -> Var:
    ops = [ctx.structure.ops[i] for i in idx]
    prod = ratio_products(ctx, [[axis_desc(a) for a in o.axes] for o in ops], [f"op {o.name!r}" for o in ops],
                          tolerance)
    # MACs are integers: rounding removes the ratios' float error (exact below 2**52 MACs per op)
    return ctx.b.emit("round", ctx.b.mul(ctx.b.const(_f64([o.macs for o in ops]), "op_macs"), prod))


def check_tolerance(name: str, tolerance: float) -> float:
    if not tolerance >= 0.0:
        raise SpecError(f"{name}: tolerance must be >= 0, got {tolerance!r}")
    return float(tolerance)


@define_spec("active_macs", deps=("unit_active",), outputs={"per_op": "op", "total": "scalar", "dense": "scalar",
                                                            "baseline": "scalar", "ratio": "scalar"})
def active_macs(ctx: Context, tolerance: float = 0.0, ops: tuple[str, ...] | None = None) -> dict[str, Var]:
    """Active MACs (1 MAC = one multiply-add) of the selected cost ops, float64.

    Outputs: `per_op` (in `structure.ops` order, selected ops only), `total`, `dense` (the ops' MACs as traced),
    `baseline` (their MACs in the original, unpruned model) and `ratio` = total / baseline.
    `ops`: op names to count (default: every op whose module or weight the compile filters keep).
    """
    tolerance = check_tolerance("active_macs", tolerance)
    idx = op_indices(ctx, ops)
    b = ctx.b
    sel = [ctx.structure.ops[i] for i in idx]
    per_op = ctx.name_items(_active_macs_per_op(ctx, idx, tolerance), [o.name for o in sel])
    total = b.sum(per_op)
    baseline = float(sum(o.baseline_macs for o in sel))
    return {
        "per_op": per_op,
        "total": total,
        "dense": b.const(torch.tensor(float(sum(o.macs for o in sel)), dtype=torch.float64), "dense_macs"),
        "baseline": b.const(torch.tensor(baseline, dtype=torch.float64), "baseline_macs"),
        "ratio": _safe_div(ctx, total, baseline),
    }


def _bops(ctx: Context, per_op: Var, idx: list[int], weight_bits: Any, act_bits: Any, name: str) -> dict[str, Var]:
    b = ctx.b
    s = ctx.structure
    w = bits_vector(s, weight_bits, f"{name}: weight_bits")[idx]
    a = bits_vector(s, act_bits, f"{name}: act_bits")[idx]
    base_op = np.asarray([s.ops[i].baseline_macs for i in idx], dtype=np.float64) * 32.0 * 32.0
    bops = b.mul(per_op, b.const(torch.from_numpy(w * a), "op_bits"))
    total = b.sum(bops)
    baseline = float(base_op.sum())
    per_op_compression = b.sub(1.0, b.div(bops, b.const(torch.from_numpy(np.maximum(base_op, 1.0)),
                                                        "op_baseline_bops")))
    names = [s.ops[i].name for i in idx]
    return {
        "per_op": ctx.name_items(bops, names),
        "total": total,
        "baseline": b.const(torch.tensor(baseline, dtype=torch.float64), "baseline_bops"),
        "compression": b.sub(1.0, _safe_div(ctx, total, baseline)),
        "per_op_compression": ctx.name_items(per_op_compression, names),
    }


@define_spec("structured_bops", deps=("unit_active",), outputs=BOPS_OUTPUTS)
def structured_bops(ctx: Context, weight_bits: Any = 32, act_bits: Any = 32, tolerance: float = 0.0,
                    ops: tuple[str, ...] | None = None) -> dict[str, Var]:
    """Structured BOPs = active MACs x activation bits x weight bits per op, float64.

    `weight_bits`/`act_bits`: one int, or a tuple with one int per op of `structure.ops` (all ops, whatever
    `ops` selects). Outputs: `per_op`, `total`, `baseline` (dense original MACs x 32 x 32), `compression`
    = 1 - total / baseline, `per_op_compression`.
    """
    tolerance = check_tolerance("structured_bops", tolerance)
    idx = op_indices(ctx, ops)
    return _bops(ctx, _active_macs_per_op(ctx, idx, tolerance), idx, weight_bits, act_bits, "structured_bops")


@define_spec("compression", deps=("structured_bops",), outputs="scalar")
def compression(ctx: Context, weight_bits: Any = 32, act_bits: Any = 32, tolerance: float = 0.0,
                ops: tuple[str, ...] | None = None) -> Var:
    """1 - structured BOPs / dense 32x32-bit BOPs of the original model (0: nothing saved)."""
    return ctx.dep("structured_bops", weight_bits=weight_bits, act_bits=act_bits, tolerance=tolerance,
                   ops=ops)["compression"]


def nonzero_count(ctx: Context, name: str, tolerance: float) -> Var:
    """Number of elements with |w| > tolerance, an int64 scalar, from the `nonzero_stats` counts shared with unit
    activity and N:M (`wtcore.nonzero.total_count`)."""
    return total_count(ctx.b, ctx.b.param(name), len(ctx.structure.param_map[name].shape), tolerance)


def stack_scalars(ctx: Context, values: Sequence[Var], dtype: torch.dtype = torch.float64) -> Var:
    """`[len(values)]` float64 vector of 0-d values (an empty constant if there are none). Per-parameter
    scalars are stacked first and the arithmetic on them is done once on the vector (fewer tiny ops)."""
    b = ctx.b
    if not values:
        return b.const(torch.zeros(0, dtype=dtype), "empty")
    return b.to_float64(b.emit("stack", *values))


@define_spec("unstructured_bops", deps=("unit_active",), outputs=BOPS_OUTPUTS)
def unstructured_bops(ctx: Context, weight_bits: Any = 32, act_bits: Any = 32, tolerance: float = 0.0,
                      ops: tuple[str, ...] | None = None) -> dict[str, Var]:
    """BOPs counting only multiply-adds with a nonzero weight: per weight op MACs x (nonzero weights / weights)
    x bits (exact in fvcore's convention, where every weight element is used equally often); weightless ops
    (attention matmuls) count their structured active MACs. Outputs as `structured_bops`."""
    tolerance = check_tolerance("unstructured_bops", tolerance)
    idx = op_indices(ctx, ops)
    s = ctx.structure
    b = ctx.b
    sel = [s.ops[i] for i in idx]
    weighted = [k for k, o in enumerate(sel) if o.param and o.kind in WEIGHT_KINDS]
    structured = _active_macs_per_op(ctx, idx, tolerance)
    if weighted:
        nnz = stack_scalars(ctx, [nonzero_count(ctx, sel[k].param, tolerance) for k in weighted])
        per_nz = [sel[k].macs / max(s.param_map[sel[k].param].numel, 1) for k in weighted]  # uses per weight
        macs = b.mul(nnz, b.const(_f64(per_nz), "weight_op_uses"))
        # per op: the weight-op value where the op has a weight, else the structured one
        pick = [len(weighted)] * len(sel)
        for j, k in enumerate(weighted):
            pick[k] = j
        has_w = torch.zeros(len(sel), dtype=torch.bool)
        has_w[weighted] = True
        padded = b.cat(macs, b.const(torch.zeros(1, dtype=torch.float64), "zero"))
        gathered = b.take(padded, b.const(torch.tensor(pick, dtype=torch.long), "weight_op_pick"))
        structured = b.where(b.const(has_w, "has_weight"), b.emit("round", gathered), structured)
    return _bops(ctx, structured, idx, weight_bits, act_bits, "unstructured_bops")


# ----------------------------------------------------------------------------- parameters
@define_spec("active_params", deps=("unit_active",), outputs={
    "per_param": "param", "total": "scalar", "numel": "scalar", "baseline": "scalar", "ratio": "scalar"})
def active_params(ctx: Context, tolerance: float = 0.0, params: tuple[str, ...] | None = None) -> dict[str, Var]:
    """Parameter elements that physical pruning of the inactive units would keep: numel x product over the
    parameter's sliced axes of (active positions / positions), float64.

    Outputs: `per_param` (selected parameters in structure order; default every parameter the compile filters
    keep), `total`, `numel` (their dense element count as traced), `baseline` (their element count in the
    original, unpruned model: `Param.baseline_shape`, kept through physical pruning) and `ratio` = total /
    baseline (as for `active_macs`; the same as total / numel until the model is physically pruned).
    """
    tolerance = check_tolerance("active_params", tolerance)
    s = ctx.structure
    names = param_names(ctx, params, [p.name for p in s.params])
    b = ctx.b
    prod = ratio_products(ctx, [param_axes(s, n) for n in names], [f"parameter {n!r}" for n in names], tolerance)
    numel = [s.param_map[n].numel for n in names]
    per = b.emit("round", b.mul(b.const(_f64(numel), "param_numel"), prod))
    total = b.sum(per)
    baseline = float(sum(s.param_map[n].baseline_numel for n in names))
    return {
        "per_param": ctx.name_items(per, names),
        "total": total,
        "numel": b.const(torch.tensor(float(sum(numel)), dtype=torch.float64), "numel"),
        "baseline": b.const(torch.tensor(baseline, dtype=torch.float64), "baseline_params"),
        "ratio": _safe_div(ctx, total, baseline),
    }
