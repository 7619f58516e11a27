"""Importance of every unit as a program: `[num_units]` scores (higher = more important), for pruning masks,
channel decay and MAC-aware ranking.

- `magnitude_importance`: the Ln norm of each unit over every coupled slice (n = 1, 2 or inf).
- `taylor_importance`: Torch-Pruning's first-order Taylor score, sum over the unit's coupled elements of
  |w * dL/dw|. A program is a pure function of one tensor per parameter, so it receives the products:
  call it on `taylor_inputs(params, grads)` (`{name: w * g}`), not on the weights.
- `bn_scale_importance`: |gamma| of the BatchNorm weights coupled to the unit (network slimming).
- `mac_aware_importance`: a base score combined with the unit's MAC (or BOP) cost, additively
  `alpha * imp / max(imp) + (1 - alpha) * (1 - mac / max(mac))` or multiplicatively
  `imp * (min(mac) / mac) ** (1 / beta)`, so that expensive units are removed first among equals.
- `unit_macs` / `unit_bops`: the MACs (BOPs) removed when that unit alone is pruned, folded at compile time
  from the IR's cost ops.
- `standardized_importance`: per group, `(max - s) / (max - min)` in [0, 1] (1 = least important), the
  exponent of Torch-Pruning's growing decay coefficients.

Group maxima and minima are fixed-shape programs: units are gathered into a padded `[groups, max size]`
table (padding reads a +-inf sentinel) and reduced with `amax`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ParamsError, SpecError
from ..ir import Structure
from ..lang import Var
from ..spec import Context, Spec, define_spec
from .costs import axis_desc, axis_table, bits_vector, op_indices
from .masks import norm_score

__all__ = ["group_extremum", "prunable_mask", "scalar", "taylor_inputs", "unit_cost_tensor", "unit_cost_vector"]


# ----------------------------------------------------------------------------- group reductions
def _pad_table(structure: Structure) -> torch.Tensor:
    """`[groups, max size]` unit ids, padded with `num_units` (the index of an appended sentinel)."""
    n = structure.num_units
    width = max((g.size for g in structure.groups), default=0)
    table = torch.full((len(structure.groups), width), n, dtype=torch.long)
    for i, g in enumerate(structure.groups):
        off = structure.offsets[g.name]
        table[i, : g.size] = torch.arange(off, off + g.size)
    return table


def group_extremum(ctx: Context, x: Var, kind: str, valid: Var | None = None) -> Var:
    """Per-group max (`kind="max"`) or min (`"min"`) of a `[num_units]` float vector over its `valid` units,
    `[num_groups]`; -inf (max) or +inf (min) for a group without a valid unit."""
    if kind not in ("max", "min"):
        raise SpecError(f"group_extremum: kind must be 'max' or 'min', got {kind!r}")
    b, st = ctx.b, ctx.structure
    v = x if kind == "max" else b.emit("neg", x)
    if valid is not None:
        v = b.where(valid, v, scalar(ctx, -math.inf))
    pad = ctx.cached_const("group_pad_table", lambda: _pad_table(st).reshape(-1))
    ext = b.cat(v, b.cast_like(b.const(torch.full((1,), -math.inf), "-inf"), v))
    table = b.reshape(b.take(ext, pad), (len(st.groups), -1))
    m = b.emit("amax", table, dims=(1,))
    return m if kind == "max" else b.emit("neg", m)


def scalar(ctx: Context, value: float) -> Var:
    """A 0-d float64 constant (generated code cannot spell `inf` or `nan` as a literal)."""
    return ctx.cached_const(f"scalar {value!r}", lambda: torch.tensor(float(value), dtype=torch.float64))


def _per_unit(ctx: Context, per_group: Var) -> Var:
    return ctx.b.take(per_group, ctx.unit_group_ids())


# ----------------------------------------------------------------------------- unit costs
def unit_cost_vector(structure: Structure, op_idx: Sequence[int], op_weight: np.ndarray | None = None) -> np.ndarray:
    """float64 `[num_units]`: the cost removed when each unit alone is pruned, summed over the ops `op_idx`.

    An op of `macs` MACs whose axis `a` (size `s_a`) has `c_a` positions coupled to unit `u` keeps
    `macs * prod_a (1 - c_a / s_a)` when `u` goes; the difference is `u`'s share. `op_weight` scales each op
    (bit widths for BOPs)."""
    out = np.zeros(structure.num_units, dtype=np.float64)
    for k, i in enumerate(op_idx):
        op = structure.ops[i]
        if not op.axes or op.macs == 0:
            continue
        labels = [f"op {op.name!r} axis {j}" for j in range(len(op.axes))]
        t = axis_table(structure, [axis_desc(a) for a in op.axes], labels)
        units, counts = t.units.numpy(), t.counts.numpy()
        starts = np.concatenate([[0], t.ends.numpy()[:-1]])
        keep = np.ones(structure.num_units, dtype=np.float64)
        touched = np.zeros(structure.num_units, dtype=bool)
        for a, (lo, hi) in enumerate(zip(starts, t.ends.numpy())):
            size = max(float(t.lengths[a]), 1.0)
            u, c = units[lo:hi], counts[lo:hi]
            live = c > 0
            np.multiply.at(keep, u[live], 1.0 - np.minimum(c[live] / size, 1.0))
            touched[u[live]] = True
        scale = float(op.macs) * (1.0 if op_weight is None else float(op_weight[k]))
        out[touched] += scale * (1.0 - keep[touched])
    return out


def _need_ops(ctx: Context, spec: str) -> None:
    if not ctx.structure.ops:
        raise SpecError(f"{spec}: the structure has no cost ops; trace the model with costs (wtfront.trace's default)")


@define_spec("unit_macs")
def unit_macs(ctx: Context, ops: tuple[str, ...] | None = None) -> Var:
    """MACs removed when this unit alone is pruned (1 MAC = one multiply-add), float64 `[num_units]`,
    a constant folded from the dense ops as traced. `ops`: op names (default every op of the structure:
    a unit's cost is physical, so the compile filters, which select parameters, do not apply here)."""
    _need_ops(ctx, "unit_macs")
    idx = list(range(len(ctx.structure.ops))) if ops is None else op_indices(ctx, ops)
    return ctx.b.const(torch.from_numpy(unit_cost_vector(ctx.structure, idx)), "unit_macs")


@define_spec("unit_bops")
def unit_bops(ctx: Context, weight_bits: Any = 32, act_bits: Any = 32, ops: tuple[str, ...] | None = None) -> Var:
    """BOPs (MACs x weight bits x activation bits, per op) removed when this unit alone is pruned, float64
    `[num_units]`. Bit widths: one int, or one per op of `structure.ops`."""
    _need_ops(ctx, "unit_bops")
    st = ctx.structure
    idx = list(range(len(st.ops))) if ops is None else op_indices(ctx, ops)
    bits = (bits_vector(st, weight_bits, "unit_bops: weight_bits") * bits_vector(st, act_bits, "unit_bops: act_bits"))
    return ctx.b.const(torch.from_numpy(unit_cost_vector(st, idx, bits[idx])), "unit_bops")


def unit_cost_tensor(ctx: Context, cost: str, weight_bits: Any, act_bits: Any, spec: str) -> torch.Tensor:
    """The compile-time float64 `[num_units]` vector of `unit_macs` (`cost="macs"`) or `unit_bops` (`"bops"`)."""
    _need_ops(ctx, spec)
    st = ctx.structure
    idx = list(range(len(st.ops)))
    if cost == "macs":
        return torch.from_numpy(unit_cost_vector(st, idx))
    if cost == "bops":
        bits = bits_vector(st, weight_bits, f"{spec}: weight_bits") * bits_vector(st, act_bits, f"{spec}: act_bits")
        return torch.from_numpy(unit_cost_vector(st, idx, bits))
    raise SpecError(f"{spec}: cost must be 'macs' or 'bops', got {cost!r}")


# ----------------------------------------------------------------------------- scores
@define_spec("magnitude_importance")
def magnitude_importance(ctx: Context, n: Any = 2) -> Var:
    """Ln norm of each unit over every coupled slice: n=2 `sqrt(sum w^2)`, n=1 `sum |w|`, n="inf" `max |w|`.
    (Torch-Pruning's `MagnitudeImportance(p)` sums |w|^p per layer and averages over the group's layers: the
    same order within a group.)"""
    return norm_score(ctx, n, "magnitude_importance")  # the same scores ln_structured ranks by


@define_spec("taylor_importance")
def taylor_importance(ctx: Context) -> Var:
    """First-order Taylor importance (Torch-Pruning's `TaylorImportance`, multivariable=False): the sum over
    the unit's coupled elements of |w * dL/dw|. Call the program on `taylor_inputs(params, grads)`, which
    maps every parameter name to `w * g` (weights and biases alike, as Torch-Pruning does)."""
    return ctx.dep("unit_l1")


def taylor_inputs(
    params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """`{name: w * g}` for a `taylor_importance` program; a parameter without a gradient contributes 0."""
    out = {}
    for name, w in params.items():
        g = grads.get(name)
        if g is None:
            out[name] = torch.zeros_like(w)
            continue
        if g.shape != w.shape:
            raise ParamsError(f"taylor_inputs: gradient of {name!r} has shape {tuple(g.shape)}, the weight "
                              f"{tuple(w.shape)}")
        out[name] = w.detach() * g.detach()
    return out


def _is_bn_weight(structure: Structure, name: str) -> bool:
    p = structure.param_map[name]
    return "BatchNorm" in p.module_type and len(p.shape) == 1 and name.rpartition(".")[2] in ("weight", "weight_orig")


@define_spec("bn_scale_importance")
def bn_scale_importance(ctx: Context, missing: float = math.inf) -> Var:
    """Network slimming: sum of |gamma| over the BatchNorm weights coupled to each unit (one entry for a plain
    conv channel, one per branch after a residual add). Units without a BatchNorm weight (e.g. a ViT's MLP
    features) score `missing` (default +inf: never the first to go)."""
    b, st = ctx.b, ctx.structure
    n = st.num_units
    values: list[Var] = []
    index: list[torch.Tensor] = []
    for g in st.groups:
        off = st.offsets[g.name]
        for s in ctx.slices[g.name]:
            if not _is_bn_weight(st, s.param):
                continue
            values.append(b.abs(b.emit("acc", b.param(s.param))))
            index.append(torch.from_numpy(s.unit_ids(off, n)))
    if not values:
        return b.const(torch.full((n,), float(missing)), "no BatchNorm weight")
    all_idx = torch.cat(index)
    covered = torch.zeros(n + 1, dtype=torch.bool)
    covered[all_idx] = True
    v = b.cat(*values)
    summed = b.emit("narrow", b.emit("scatter_add", b.const(all_idx, "BatchNorm unit index"), v, size=n + 1),
                    dim=0, start=0, length=n)
    return b.where(b.const(covered[:n], "units with BatchNorm"), summed, scalar(ctx, missing))


def _base(ctx: Context, base: Any, spec: str) -> Var:
    if isinstance(base, str):
        return ctx.dep(base)
    if isinstance(base, Spec):
        return ctx.dep(base.name, **dict(base.options))
    raise SpecError(f"{spec}: base must be a spec name or a wtcore.Spec, got {base!r}")


@define_spec("mac_aware_importance")
def mac_aware_importance(
    ctx: Context, base: Any = "magnitude_importance", mode: str = "additive", alpha: float = 0.5, beta: float = 1.0,
    cost: str = "macs", weight_bits: Any = 32, act_bits: Any = 32, normalize: str = "group",
) -> Var:
    """A base importance (`base`: spec name or `wtcore.Spec`, default the unit L2 norm) made cost-aware.

    `mode="additive"`: `alpha * imp / max(imp) + (1 - alpha) * (1 - mac / max(mac))`;
    `mode="multiplicative"`: `imp * (min(mac) / mac) ** (1 / beta)`.
    `mac` is `unit_macs` (or `unit_bops` with `cost="bops"`); its max and min are taken over all units of
    prunable groups (within one conv group every channel costs the same, so a per-group range would be
    empty), the min over units with a cost > 0, and units that cost nothing count as the cheapest.
    `max(imp)` is per group (`normalize="group"`, default: scores of layers of different scale become
    comparable) or over all prunable units (`"global"`); a maximum of 0 (or +inf) leaves the scores as they
    are. Both forms rank an expensive unit below a cheap one of equal importance.
    """
    if mode not in ("additive", "multiplicative"):
        raise SpecError(f"mac_aware_importance: mode must be 'additive' or 'multiplicative', got {mode!r}")
    if normalize not in ("group", "global"):
        raise SpecError(f"mac_aware_importance: normalize must be 'group' or 'global', got {normalize!r}")
    if mode == "additive" and not 0.0 <= alpha <= 1.0:
        raise SpecError(f"mac_aware_importance: alpha must be in [0, 1], got {alpha!r}")
    if mode == "multiplicative" and not beta > 0:
        raise SpecError(f"mac_aware_importance: beta must be > 0, got {beta!r}")
    b = ctx.b
    imp = b.to_float64(_base(ctx, base, "mac_aware_importance"))
    mac = unit_cost_tensor(ctx, cost, weight_bits, act_bits, "mac_aware_importance")
    prun = prunable_mask(ctx.structure)
    pool = mac[prun] if bool(prun.any()) else mac
    positive = pool[pool > 0]
    if positive.numel() == 0:
        raise SpecError(f"mac_aware_importance: no unit of a prunable group has a {cost} cost; check the cost ops")
    max_mac, min_mac = float(positive.max()), float(positive.min())
    if mode == "multiplicative":
        factor = (min_mac / mac.clamp(min=min_mac)) ** (1.0 / beta)
        return b.mul(imp, b.const(factor, f"(min {cost} / {cost}) ** (1 / beta)"))
    finite = b.lt(imp, scalar(ctx, math.inf))
    if normalize == "group":
        top = _per_unit(ctx, group_extremum(ctx, imp, "max", finite))
    else:
        valid = b.logical_and(finite, ctx.prunable_units()) if bool(prun.any()) else finite
        top = b.emit("amax", b.where(valid, imp, scalar(ctx, -math.inf)), dims=(0,))
    ok = b.logical_and(b.gt(top, 0.0), b.lt(top, scalar(ctx, math.inf)))
    scaled = b.where(ok, b.div(imp, b.where(ok, top, 1.0)), imp)
    cost_term = b.const((1.0 - mac / max_mac).clamp(min=0.0), f"1 - {cost} / max {cost}")
    return b.add(b.mul(scaled, float(alpha)), b.mul(cost_term, 1.0 - float(alpha)))


def prunable_mask(structure: Structure) -> torch.Tensor:
    """`[num_units]` bool: the unit's group is prunable."""
    if not structure.groups:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat([torch.full((g.size,), g.prunable, dtype=torch.bool) for g in structure.groups])


@define_spec("standardized_importance")
def standardized_importance(ctx: Context, base: Any = "unit_l2", eps: float = 0.0) -> Var:
    """Per group, `(max - s) / (max - min + eps)` of a base score `s` (spec name or `wtcore.Spec`, default the
    unit L2 norm): 0 for the most important unit of a group, 1 for the least. A group whose scores are all
    equal (and `eps=0`) gives 0. Units of groups that are not prunable give 0."""
    if not eps >= 0.0:
        raise SpecError(f"standardized_importance: eps must be >= 0, got {eps!r}")
    b = ctx.b
    s = b.to_float64(_base(ctx, base, "standardized_importance"))
    hi = _per_unit(ctx, group_extremum(ctx, s, "max"))
    lo = _per_unit(ctx, group_extremum(ctx, s, "min"))
    span = b.add(b.sub(hi, lo), float(eps))
    ok = b.logical_and(b.gt(span, 0.0), ctx.prunable_units())
    return b.where(ok, b.div(b.sub(hi, s), b.where(ok, span, 1.0)), 0.0)
