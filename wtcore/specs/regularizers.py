"""Differentiable regularizers to add to the training loss, and the IR side of gradient-side channel decay.

Group lasso is `sum_u weight_u * term_u` over the units of prunable groups, where
- `term_u` is the unit's L2 norm over every coupled slice, or with `reweighted=True`
  `||u|| / stop_grad(||u|| + eps)`: every nonzero unit then contributes about 1 whatever its scale, so the
  penalty approximates the number of live units (a log-penalty step; gradient `w / ||u||^2`, 0 at a zero unit);
- `weight_u` is `sqrt(params per unit)` (`weighted=True`, the classic group lasso), 1 (`weighted=False`), or
  the unit's cost (`weighted="macs"` / `"bops"`): the MACs (BOPs) removed when that unit alone is pruned,
  divided by their mean over the regularized units, so weights average 1 and `lam` keeps its scale while
  expensive units are pushed harder.

Channel decay (see `wtfront.train.decay`) adds `reg * gamma_u * w` to the gradient of every element of unit `u`
after `backward()`; `decay_gamma` computes gamma as a program and `decay_plan`/`decay_coefficients` turn a
`[num_units]` gamma into one broadcastable coefficient tensor per parameter with index tensors built once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SpecError
from ..filters import select_slices
from ..ir import Structure
from ..lang import Var
from ..masking import slice_lookup
from ..spec import Context, define_spec
from .importance import prunable_mask, unit_cost_tensor

__all__ = ["ParamDecay", "decay_coefficients", "decay_plan", "plan_to"]

WEIGHTINGS = (True, False, "sqrt_params", "none", "macs", "bops")


def _unit_weights(ctx: Context, weighted: Any, regularized: torch.Tensor, weight_bits: Any, act_bits: Any,
                  like: Var) -> Var | None:
    """Per-unit weights of group lasso, or None for weight 1."""
    b = ctx.b
    if weighted in (True, "sqrt_params"):
        return b.cast_like(b.sqrt(ctx.params_per_unit()), like)
    if weighted in (False, "none"):
        return None
    cost = unit_cost_tensor(ctx, weighted, weight_bits, act_bits, "group_lasso")
    pool = cost[regularized]
    mean = float(pool.mean()) if pool.numel() else 0.0
    if not mean > 0:
        raise SpecError(f"group_lasso: weighted={weighted!r} but the regularized units have no {weighted} cost; "
                        "check the structure's cost ops or use weighted=True")
    return b.cast_like(b.const(cost / mean, f"unit {weighted} / mean"), like)


@define_spec("group_lasso", deps=("unit_l2",), outputs="scalar")
def group_lasso(ctx: Context, weighted: Any = True, groups: str = "prunable", reweighted: bool = False,
                eps: float = 0.0, weight_bits: Any = 32, act_bits: Any = 32) -> Var:
    """Group lasso: sum over units of weight * ||unit||_2.

    `weighted`: True / "sqrt_params" (sqrt of the unit's parameter count, default), False / "none" (plain sum
    of norms), "macs" / "bops" (the unit's `unit_macs` / `unit_bops` cost divided by its mean over the
    regularized units; `weight_bits`/`act_bits` as in `structured_bops`). `reweighted=True` replaces each
    norm by `||u|| / stop_grad(||u|| + eps)` (about 1 per live unit, 0 for a zero unit).
    `groups="prunable"` (default) leaves out units that are never pruned (e.g. a classifier's logits);
    `groups="all"` regularizes every unit. The gradient is finite (0) at units that are exactly zero.
    """
    if groups not in ("prunable", "all"):
        raise SpecError(f"group_lasso: groups must be 'prunable' or 'all', got {groups!r}")
    if weighted not in WEIGHTINGS or (isinstance(weighted, (int, float)) and not isinstance(weighted, bool)):
        raise SpecError(f"group_lasso: weighted must be one of {WEIGHTINGS}, got {weighted!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise SpecError(f"group_lasso: eps must be a number >= 0, got {eps!r}")
    b = ctx.b
    norms = ctx.dep("unit_l2")
    if reweighted:
        den = b.add(b.emit("detach", norms), float(eps))
        norms = b.div(norms, b.where(b.gt(den, 0.0), den, 1.0))
    regularized = prunable_mask(ctx.structure) if groups == "prunable" else torch.ones(ctx.structure.num_units,
                                                                                       dtype=torch.bool)
    w = _unit_weights(ctx, weighted, regularized, weight_bits, act_bits, norms)
    if w is not None:
        norms = b.mul(norms, w)
    if groups == "prunable":
        norms = b.where(ctx.prunable_units(), norms, 0.0)
    return b.sum(norms)


@define_spec("mac_group_lasso", deps=("group_lasso",), outputs="scalar")
def mac_group_lasso(ctx: Context, groups: str = "prunable", reweighted: bool = False, eps: float = 0.0) -> Var:
    """Group lasso weighted by each unit's MAC cost (`group_lasso(weighted="macs")`)."""
    return ctx.dep("group_lasso", weighted="macs", groups=groups, reweighted=reweighted, eps=eps)


@define_spec("bop_group_lasso", deps=("group_lasso",), outputs="scalar")
def bop_group_lasso(ctx: Context, groups: str = "prunable", reweighted: bool = False, eps: float = 0.0,
                    weight_bits: Any = 32, act_bits: Any = 32) -> Var:
    """Group lasso weighted by each unit's BOP cost (`group_lasso(weighted="bops")`)."""
    return ctx.dep("group_lasso", weighted="bops", groups=groups, reweighted=reweighted, eps=eps,
                   weight_bits=weight_bits, act_bits=act_bits)


@define_spec("reweighted_group_lasso", deps=("group_lasso",), outputs="scalar")
def reweighted_group_lasso(ctx: Context, weighted: Any = False, groups: str = "prunable", eps: float = 0.0) -> Var:
    """Sum over units of `||u|| / stop_grad(||u|| + eps)`: each live unit contributes about 1
    (`group_lasso(reweighted=True)`, unweighted by default)."""
    return ctx.dep("group_lasso", weighted=weighted, groups=groups, reweighted=True, eps=eps)


# ----------------------------------------------------------------------------- channel decay
RULES = ("depgraph", "uniform")


@define_spec("decay_gamma")
def decay_gamma(ctx: Context, rule: str = "depgraph", alpha: float = 16.0, base: Any = "unit_l2") -> Var:
    """Per-unit channel-decay coefficients, float64 `[num_units]` (0 for units of groups that are not prunable).

    `rule="depgraph"` (Torch-Pruning's `GroupNormPruner.regularize`): `alpha ** ((max - s) / (max - min))`
    within each group, `s` the base importance (default the unit L2 norm): 1 for the most important unit of
    the group, `alpha` for the least; a group whose scores are all equal gets 1 (Torch-Pruning gets NaN).
    `rule="uniform"`: 1 (group weight decay)."""
    if rule not in RULES:
        raise SpecError(f"decay_gamma: rule must be one of {RULES} ('growing' keeps state: use wtfront.ChannelDecay), "
                        f"got {rule!r}")
    b = ctx.b
    if rule == "uniform":
        return b.const(prunable_mask(ctx.structure).to(torch.float64), "prunable units")
    if not alpha >= 1.0:
        raise SpecError(f"decay_gamma: alpha must be >= 1 (the largest coefficient), got {alpha!r}")
    std = ctx.dep("standardized_importance", base=base, eps=0.0)
    return b.where(ctx.prunable_units(), b.emit("pow", float(alpha), std), 0.0)


@dataclass(frozen=True)
class ParamDecay:
    """How one parameter's coefficient is gathered from a `[num_units]` gamma: one (unit index, view) per slice
    (index `num_units` = no unit), plus elements two slices give the same unit (flat positions, units),
    whose second count is subtracted."""

    name: str
    shape: tuple[int, ...]
    terms: tuple[tuple[torch.Tensor, tuple[int, ...]], ...]
    overlap: tuple[torch.Tensor, torch.Tensor] | None = None


def _is_bias(structure: Structure, name: str) -> bool:
    names = (name, *structure.param_map[name].aliases)
    return any(n.rpartition(".")[2] in ("bias", "bias_orig") or n.endswith(".bias.original") for n in names)


def decay_plan(structure: Structure, include: Iterable[str] | None = None, ignore: Iterable[str] | None = None,
               bias: bool = False, prunable_only: bool = True) -> list[ParamDecay]:
    """Index tensors, computed once, that expand a per-unit gamma to every coupled parameter element.

    Slices are selected like a program's (`include`/`ignore` over parameter and module names); biases are
    left out unless `bias=True` (Torch-Pruning's default), and slices of groups that are not prunable unless
    `prunable_only=False`."""
    n = structure.num_units
    kept = select_slices(structure, include, ignore)
    by_param: dict[str, list[tuple[Any, int, str]]] = {}
    for g in structure.groups:
        if prunable_only and not g.prunable:
            continue
        for s in kept[g.name]:
            if not bias and _is_bias(structure, s.param):
                continue
            by_param.setdefault(s.param, []).append((s, structure.offsets[g.name], g.name))
    plan = []
    for p in structure.params:
        items = by_param.get(p.name)
        if not items:
            continue
        terms = []
        for s, off, _ in items:
            idx, view = slice_lookup(s, p.shape, off, n)
            terms.append((idx, tuple(view)))
        overlap = None
        names = [g for _, _, g in items]
        if len(set(names)) < len(names):  # two slices in one group may give an element the same unit twice
            maps = [idx.reshape(view).expand(p.shape).reshape(-1) for idx, view in terms]
            pos, units = [], []
            for j in range(1, len(maps)):
                dup = torch.zeros_like(maps[j], dtype=torch.bool)
                for i in range(j):
                    if names[i] == names[j]:
                        dup |= (maps[j] == maps[i]) & (maps[j] < n)
                where = dup.nonzero().flatten()
                pos.append(where)
                units.append(maps[j][where])
            if any(x.numel() for x in pos):
                overlap = (torch.cat(pos), torch.cat(units))
        plan.append(ParamDecay(p.name, p.shape, tuple(terms), overlap))
    return plan


def decay_coefficients(plan: Sequence[ParamDecay], gamma: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per parameter, the sum of gamma over the distinct units of each element (broadcastable to its shape;
    full-shape where two slices overlap). The index tensors must be on gamma's device."""
    ext = torch.cat([gamma, gamma.new_zeros(1)])
    out: dict[str, torch.Tensor] = {}
    for d in plan:
        coef: torch.Tensor | None = None
        for idx, view in d.terms:
            v = ext.index_select(0, idx).reshape(view)
            coef = v if coef is None else coef + v
        assert coef is not None
        if d.overlap is not None:
            pos, units = d.overlap
            coef = coef.expand(d.shape).contiguous().reshape(-1)
            coef = coef.index_add(0, pos, -ext.index_select(0, units)).reshape(d.shape)
        out[d.name] = coef
    return out


def plan_to(plan: Sequence[ParamDecay], device: torch.device) -> list[ParamDecay]:
    """The plan with its index tensors on `device`."""
    def mv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    return [ParamDecay(d.name, d.shape, tuple((mv(i), v) for i, v in d.terms),
                       None if d.overlap is None else (mv(d.overlap[0]), mv(d.overlap[1]))) for d in plan]

