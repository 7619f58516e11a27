"""Sparsity specs: unstructured zeros, N:M blocks, pruning summaries per group, a histogram of unit norms.

Zeros are counted from the same `|w| > tolerance` mask the activity reduction uses (hash-consed, so a
parameter is compared once per program). Everything is fixed-shape: no data-dependent sizes, so the specs
run under `torch.func.vmap` and `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SpecError
from ..ir import UnitGroup
from ..lang import Var
from ..nonzero import stats_blocks
from ..spec import Context, define_spec
from .costs import (
    WEIGHT_KINDS,
    check_tolerance,
    inactive_f64,
    nonzero_count,
    param_names,
    stack_scalars,
    weight_params,
)

__all__ = ["NM_KINDS", "nm_params"]

#: Op kinds whose weight is `[out, in, *kernel]` with the input axis 1: N:M blocks run along it.
NM_KINDS = frozenset({"linear", "conv", "grouped_conv", "depthwise_conv"})


NM_OUTPUTS = {
    **dict.fromkeys(("strict_fraction", "eligible_fraction", "blocks", "strict_blocks", "eligible_blocks",
                     "tail_elements", "layers", "strict_layers", "eligible_layers"), "scalar"),
    **dict.fromkeys(("per_param_strict_fraction", "per_param_eligible_fraction", "per_param_tail_elements"), "param"),
}


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


@define_spec("unstructured_sparsity", outputs={"per_param": "param", "total": "scalar", "zeros": "scalar",
                                               "numel": "scalar"})
def unstructured_sparsity(ctx: Context, tolerance: float = 0.0, params: tuple[str, ...] | None = None
                          ) -> dict[str, Var]:
    """Fraction of exactly-zero (|w| <= tolerance) elements per weight and in total, float64.

    Default parameters: the weights of conv/linear/matmul cost ops that the compile filters keep (every
    parameter with 2+ dims if the structure has no cost ops). The total is weighted by element count
    (zeros / elements over all selected weights), not a mean of fractions. Outputs: `per_param`, `total`,
    `zeros`, `numel`.
    """
    tolerance = check_tolerance("unstructured_sparsity", tolerance)
    s = ctx.structure
    b = ctx.b
    names = param_names(ctx, params, weight_params(s, WEIGHT_KINDS))
    numel = [s.param_map[n].numel for n in names]
    nnz = stack_scalars(ctx, [nonzero_count(ctx, n, tolerance) for n in names])
    numel_c = b.const(torch.tensor(numel, dtype=torch.float64), "param_numel")
    zeros = b.sub(numel_c, nnz)
    total_numel = float(sum(numel))
    zsum = b.sum(zeros)
    per_param = b.div(zeros, b.const(torch.tensor([max(n, 1) for n in numel], dtype=torch.float64),
                                     "param_numel_safe"))
    return {
        "per_param": ctx.name_items(per_param, names),
        "total": b.div(zsum, total_numel if total_numel > 0 else 1.0),
        "zeros": zsum,
        "numel": b.const(_f64(total_numel), "numel"),
    }


def nm_params(ctx: Context, params: tuple[str, ...] | None) -> list[str]:
    """Weights N:M applies to: of linear and (non-transposed) conv ops, input axis 1."""
    names = param_names(ctx, params, weight_params(ctx.structure, NM_KINDS))
    for n in names:
        if len(ctx.structure.param_map[n].shape) < 2:
            raise SpecError(f"nm_sparsity: parameter {n!r} has {len(ctx.structure.param_map[n].shape)} dims; "
                            "N:M blocks run along axis 1 of 2+-dim weights")
    return names


@define_spec("nm_sparsity", outputs=NM_OUTPUTS)
def nm_sparsity(ctx: Context, n: int = 2, m: int = 4, tolerance: float = 0.0,
                params: tuple[str, ...] | None = None) -> dict[str, Var]:
    """N:M sparsity along the input axis (axis 1) of linear and conv weights `[out, in, *kernel]`: for every
    output row and kernel position, consecutive blocks of `m` input entries.

    A block is *strict* with exactly `n` zeros, *eligible* with at least `n` (the TensorRT rule). When `in` is
    not a multiple of `m`, the last `in % m` entries of each row are *tail* elements: in no block, reported
    separately, and a weight with a tail counts as neither a strict nor an eligible layer.
    Outputs: `strict_fraction`, `eligible_fraction` (of all complete blocks), `blocks`, `strict_blocks`,
    `eligible_blocks`, `tail_elements`, `layers`, `strict_layers`, `eligible_layers`, and per weight
    `per_param_strict_fraction`, `per_param_eligible_fraction`, `per_param_tail_elements`.
    """
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 0 <= n <= m or m < 1:
        raise SpecError(f"nm_sparsity: need integers 0 <= n <= m, m >= 1; got n={n!r}, m={m!r}")
    tolerance = check_tolerance("nm_sparsity", tolerance)
    s = ctx.structure
    b = ctx.b
    names = nm_params(ctx, params)
    blocks, tails, s1, s2 = [], [], [], []
    keep = m - n  # nonzeros in a block with exactly n zeros
    for name in names:
        shape = s.param_map[name].shape
        o, c = shape[0], shape[1]
        k = math.prod(shape[2:])
        nb = c // m
        blocks.append(o * nb * k)
        tails.append(o * (c - nb * m) * k)
        if nb:  # blocks with exactly / at most `keep` nonzeros, with the zero counts (`wtcore.nonzero.stats`)
            strict, eligible = stats_blocks(b, b.param(name), tolerance, m, keep)
            s1.append(strict)
            s2.append(eligible)
    blocks_np = np.asarray(blocks, dtype=np.float64)
    tails_np = np.asarray(tails, dtype=np.float64)
    blocks_c = b.const(torch.from_numpy(blocks_np), "nm_blocks")
    has = [i for i, nb in enumerate(blocks) if nb]
    if has:
        strict_h, elig_h = stack_scalars(ctx, s1), stack_scalars(ctx, s2)
        if len(has) == len(blocks):
            strict_v, elig_v = strict_h, elig_h
        else:  # weights without a complete block count none
            pick = torch.full((len(blocks),), len(has), dtype=torch.long)
            pick[has] = torch.arange(len(has))
            zero = b.const(torch.zeros(1, dtype=torch.float64), "zero")
            idx = b.const(pick, "nm_pick")
            strict_v = b.take(b.cat(strict_h, zero), idx)
            elig_v = b.take(b.cat(elig_h, zero), idx)
    else:
        strict_v = elig_v = b.const(torch.zeros(len(blocks), dtype=torch.float64), "zeros")
    safe = b.const(torch.from_numpy(np.maximum(blocks_np, 1.0)), "nm_blocks_safe")
    has_blocks_no_tail = b.const(torch.from_numpy((blocks_np > 0) & (tails_np == 0)), "nm_layer_ok")
    total_blocks = float(blocks_np.sum())
    s_sum, e_sum = b.sum(strict_v), b.sum(elig_v)
    strict_layer = b.logical_and(b.eq(strict_v, blocks_c), has_blocks_no_tail)
    elig_layer = b.logical_and(b.eq(elig_v, blocks_c), has_blocks_no_tail)
    denom = total_blocks if total_blocks > 0 else 1.0
    return {
        "strict_fraction": b.div(s_sum, denom),
        "eligible_fraction": b.div(e_sum, denom),
        "blocks": b.const(_f64(total_blocks), "nm_total_blocks"),
        "strict_blocks": s_sum,
        "eligible_blocks": e_sum,
        "tail_elements": b.const(_f64(tails_np.sum()), "nm_tail"),
        "layers": b.const(_f64(len(names)), "nm_layers"),
        "strict_layers": b.sum(b.to_float64(strict_layer)),
        "eligible_layers": b.sum(b.to_float64(elig_layer)),
        "per_param_strict_fraction": ctx.name_items(b.div(strict_v, safe), names),
        "per_param_eligible_fraction": ctx.name_items(b.div(elig_v, safe), names),
        "per_param_tail_elements": ctx.name_items(b.const(torch.from_numpy(tails_np), "nm_tails"), names),
    }


def _group_indices(ctx: Context, groups: tuple[str, ...] | None) -> list[int]:
    s = ctx.structure
    if groups is None:
        return list(range(len(s.groups)))
    bad = [g for g in groups if g not in s.group_map]
    if bad:
        raise SpecError(f"unknown unit group(s) {bad[:5]}; groups look like {[g.name for g in s.groups[:3]]}")
    return sorted(s.group_index(g) for g in dict.fromkeys(groups))


@define_spec("group_pruning_summary", deps=("unit_active",), outputs={
    "pruned_units": "scalar", "pruned_params": "scalar", "units": "scalar", "per_group_pruned_units": "group",
    "per_group_pruned_params": "group"})
def group_pruning_summary(ctx: Context, tolerance: float = 0.0, groups: tuple[str, ...] | None = None
                          ) -> dict[str, Var]:
    """Pruned units and group-attributed pruned parameters, in total and per group, float64.

    A unit is pruned when it is inactive (every coupled element |w| <= tolerance) in a prunable group or
    physically removed (the group's `baseline_size` - `size`); zeros of a group that is not prunable (a
    zero-initialized classifier) are not pruning, as physical pruning never removes them. A group's pruned
    parameters are the coupled elements of its pruned inactive units (`params_per_unit`, after compile
    filters) plus those its removed units held in the original shapes (`Param.baseline_shape`); an element
    coupled to pruned units of two groups counts in both.
    Outputs: `pruned_units`, `pruned_params`, `units` (baseline units),
    `per_group_pruned_units`, `per_group_pruned_params` (selected groups in structure order).
    """
    tolerance = check_tolerance("group_pruning_summary", tolerance)
    s = ctx.structure
    b = ctx.b
    idx = _group_indices(ctx, groups)
    names = [s.groups[i].name for i in idx]
    if s.num_units == 0:
        zeros = ctx.name_items(b.const(torch.zeros(len(idx), dtype=torch.float64), "zeros"), names)
        return {"pruned_units": b.sum(zeros), "pruned_params": b.sum(zeros), "units": b.sum(zeros),
                "per_group_pruned_units": zeros, "per_group_pruned_params": zeros}
    inactive = b.mul(inactive_f64(ctx, tolerance), b.to_float64(ctx.prunable_units()))
    ends = ctx.group_ends()
    units = b.segment_sum_sorted(inactive, ends)
    params = b.segment_sum_sorted(b.mul(inactive, b.to_float64(ctx.params_per_unit())), ends)
    removed = [float(g.baseline_size - g.size) for g in s.groups]
    units = b.add(units, b.const(torch.tensor(removed, dtype=torch.float64), "removed_units"))
    if any(removed):
        params = b.add(params, b.const(torch.tensor([_removed_params(ctx, g) for g in s.groups],
                                                    dtype=torch.float64), "removed_params"))
    if idx != list(range(len(s.groups))):
        sel = b.const(torch.tensor(idx, dtype=torch.long), "selected_groups")
        units, params = b.take(units, sel), b.take(params, sel)
    return {
        "pruned_units": b.sum(units),
        "pruned_params": b.sum(params),
        "units": b.const(_f64(sum(s.groups[i].baseline_size for i in idx)), "baseline_units"),
        "per_group_pruned_units": ctx.name_items(units, names),
        "per_group_pruned_params": ctx.name_items(params, names),
    }


def _removed_params(ctx: Context, g: UnitGroup) -> float:
    """Group-attributed parameters of the units physical pruning removed from `g`: per (filtered) slice, the
    removed units times the slice's entries per unit times the elements one entry held in the original
    (unpruned) parameter, `baseline_numel / baseline_shape[axis]`; the same count `params_per_unit` gives the
    units while they were only zeroed."""
    r = g.baseline_size - g.size
    if r <= 0:
        return 0.0
    total = 0.0
    for sl in ctx.slices[g.name]:
        p = ctx.structure.param_map[sl.param]
        positions = p.baseline_shape[sl.axis] * (sl.groups if sl.groups > 1 else 1)
        per_entry = p.baseline_numel / max(positions, 1)
        if g.size:
            per_unit = int((sl.unit_ids() >= 0).sum()) / g.size
        else:  # every unit removed: the axis lost exactly the removed entries
            per_unit = (positions - p.shape[sl.axis] * (sl.groups if sl.groups > 1 else 1)) / r
        total += r * per_unit * per_entry
    return float(round(total))


def histogram_edges(bins: int, lo: float, hi: float, log: bool) -> torch.Tensor:
    """The `bins + 1` edges of `unit_l2_histogram` (log- or linearly spaced from lo to hi), float64."""
    if not (isinstance(bins, int) and bins >= 1) or not (0 <= lo < hi) or (log and lo <= 0):
        raise SpecError(f"unit_l2_histogram: need bins >= 1 and 0 <= lo < hi (lo > 0 when log=True); "
                        f"got bins={bins!r}, lo={lo!r}, hi={hi!r}")
    if log:
        return torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


@define_spec("unit_l2_histogram", deps=("unit_l2",), outputs={
    "counts": "bin", "below": "scalar", "above": "scalar", "zero": "scalar", "units": "scalar", "edges": "edge"})
def unit_l2_histogram(ctx: Context, bins: int = 16, lo: float = 1e-6, hi: float = 1e2, log: bool = True,
                      groups: str = "prunable") -> dict[str, Var]:
    """Histogram of unit L2 norms over fixed bins (fixed shapes: vmap-able, no bincount), int64 counts.

    `counts[k]` = units with edges[k] <= norm < edges[k+1]; `below` (norm < lo, including exact zeros),
    `above` (norm >= hi), `zero` (norm == 0), `units` (units counted), `edges` (float64, bins + 1).
    `groups="prunable"` counts units of prunable groups, `"all"` every unit; units with no coupled element
    after compile filters are never counted.
    """
    if groups not in ("prunable", "all"):
        raise SpecError(f"unit_l2_histogram: groups must be 'prunable' or 'all', got {groups!r}")
    edges = histogram_edges(bins, lo, hi, log)
    b = ctx.b
    s = ctx.structure
    valid = torch.ones(s.num_units, dtype=torch.bool)
    if groups == "prunable":
        valid = torch.cat([torch.full((g.size,), g.prunable, dtype=torch.bool) for g in s.groups]) \
            if s.groups else valid
    valid_c = b.logical_and(b.const(valid, "histogram_units"), b.gt(ctx.params_per_unit(), 0))
    x = b.to_float64(ctx.dep("unit_l2"))
    ge = b.ge(b.reshape(x, (-1, 1)), b.const(edges.reshape(1, -1), "histogram_edges"))
    cum = b.sum(b.logical_and(ge, b.reshape(valid_c, (-1, 1))), (0,))  # units >= each edge, [bins+1]
    n_valid = b.sum(valid_c)
    counts = b.sub(b.emit("narrow", cum, dim=0, start=0, length=bins),
                   b.emit("narrow", cum, dim=0, start=1, length=bins))
    return {
        "counts": ctx.name_items(counts, [f"ge_{e:.3g}" for e in edges[:-1].tolist()]),
        "below": b.sub(n_valid, b.emit("select", cum, dim=0, index=0)),
        "above": b.emit("select", cum, dim=0, index=bins),
        "zero": b.sum(b.logical_and(b.eq(x, 0.0), valid_c)),
        "units": n_valid,
        "edges": b.const(edges, "edges"),
    }
