"""Pruning masks as programs: which units (or elements) to remove, from the parameters alone.

Structured masks (`ln_structured`, `random_structured`, `importance`, `custom`) output a `[num_units]` bool
*keep* vector (True = keep); `per_param=True` adds the element mask of every parameter it touches.
Unstructured masks (`l1_unstructured`, `random_unstructured`, `nm`) output one element mask per parameter.

Semantics follow `torch.nn.utils.prune` where they overlap: `amount` is a count (int) or a fraction
(float, rounded half to even), the lowest scores go first, ties go to the lower index. A mask computed on
parameters that an earlier mask already zeroed (fake pruning) is **relative to what remains**: units (or
elements) that are exactly zero stay pruned and `amount` counts among the others, like torch's
`PruningContainer`. Deliberate differences: a group always keeps at least one unit (a layer with no
channel cannot be built), and "already pruned" means "exactly zero" because a program sees values only.

Everything runs as a straight-line program over fixed sizes: per-unit scores come from the shared
`unit_reduce` (one `index_add`) or, for `n=inf`, from a dense per-parameter `amax` and one fixed-shape
gather per distinct entry count (no scatter); ranks come from stable `argsort`s of constant length, counts
from cumulative sums; no `nonzero`, `.item()` or boolean indexing.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch

from ..errors import SpecError, StructureError
from ..ir import Slice, Structure
from ..lang import Var
from ..masking import as_unit_vector, slice_lookup, validate_amount
from ..policy import DEFAULT_NORMALIZE, check_normalize, default_max_fraction
from ..realizable import TieProgram, eligible_groups, group_caps, unit_ties
from ..spec import Context, define_spec

__all__ = ["SCOPES", "isomorphism_key"]

SCOPES = ("local", "global", "isomorphic")


# ----------------------------------------------------------------------------------------- helpers
def name_patterns(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(f"{what} must be a name, an fnmatch pattern or a tuple of them, got {value!r}")


def _need_amount(amount: Any, spec: str) -> int | float:
    if amount is None:
        raise SpecError(f"{spec} needs amount= (an int count or a float fraction in [0, 1])")
    return validate_amount(amount, f"{spec}: amount")


def isomorphism_key(structure: Structure, group_name: str) -> tuple[Any, ...]:
    """Groups with equal keys have the same structure up to parameter names (kind, size, and for every
    slice the module type, shape, axis, grouping and index pattern), e.g. the MLP of every ViT block."""
    g = structure.group_map[group_name]
    pm = structure.param_map
    return (
        g.kind,
        g.size,
        tuple(
            (pm[s.param].module_type, pm[s.param].shape, s.axis, s.groups, s.group_axis, s.index) for s in g.slices
        ),
    )


def mask_outputs(per_param: bool = False, **_: Any) -> str | dict[str, str]:
    """A structured mask's outputs: the unit keep-vector, and with `per_param` every parameter's element mask."""
    return {"units": "unit", "*": "elements"} if per_param else "unit"


class _Groups:
    """Compile-time per-group and per-unit constants of one structured mask request."""

    def __init__(
        self, ctx: Context, groups: tuple[str, ...] | None, scope: str, max_fraction: float, spec: str,
        only: set[str] | None = None, lossy: bool = False,
    ) -> None:
        st = ctx.structure
        self.sizes = [g.size for g in st.groups]
        self.eligible = eligible_groups(st, groups, spec, lossy=lossy, only=only)
        self.caps = group_caps(st, self.eligible, max_fraction)
        if scope == "local":
            self.domain = [i for i in range(len(st.groups))]
        elif scope == "global":
            self.domain = [0 if e else 1 for e in self.eligible]
        else:
            keys: dict[tuple[Any, ...], int] = {}
            self.domain = []
            for g, e in zip(st.groups, self.eligible):
                self.domain.append(keys.setdefault(isomorphism_key(st, g.name), len(keys)) if e else -1)
            self.domain = [d if d >= 0 else len(keys) for d in self.domain]
        self.gid = torch.repeat_interleave(torch.arange(len(st.groups)), torch.tensor(self.sizes))
        self.unit_start = torch.tensor([st.offsets[g.name] for g in st.groups]).repeat_interleave(
            torch.tensor(self.sizes)
        )

    def domain_sizes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for d, e, n in zip(self.domain, self.eligible, self.sizes):
            if e:
                out[d] = out.get(d, 0) + n
        return out


def _rank(b: Any, score: Var, key: Var, first: Var | None = None) -> Var:
    """Position of every entry in the order (key, score, index): two stable argsorts of constant length.
    `first`: a constant order that replaces the index as the last key (to keep tied units together)."""
    if first is None:
        p1 = b.emit("argsort", score, dim=0)
    else:
        p1 = b.take(first, b.emit("argsort", b.take(score, first), dim=0))
    p = b.take(p1, b.emit("argsort", b.take(key, p1), dim=0))
    return b.emit("argsort", p, dim=0)


def _count(b: Any, live: Var, amount: int | float) -> Var:
    """How many of `live` (an int64 count per group or domain) to remove: torch's rounding, in float64."""
    if isinstance(amount, int):
        return b.emit("minimum", live, amount)
    return b.to_long(b.emit("round", b.mul(b.to_float64(live), float(amount))))


def _structured_keep(
    ctx: Context, score: Var, spec: str, *, amount: Any, scope: str, groups: Any, max_fraction: float | None,
    round_to: int, normalize: str | None, only: set[str] | None = None, lossy: bool = False,
) -> Var:
    """The keep-vector of a structured mask ranking units by `score` (lowest removed first)."""
    amount = _need_amount(amount, spec)
    if scope not in SCOPES:
        raise SpecError(f"{spec}: scope must be one of {SCOPES}, got {scope!r}")
    if max_fraction is None:
        max_fraction = default_max_fraction(scope)
    if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float)) or not 0 <= max_fraction <= 1:
        raise SpecError(f"{spec}: max_fraction must be a number in [0, 1], got {max_fraction!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SpecError(f"{spec}: round_to must be a positive int, got {round_to!r}")
    check_normalize(normalize, spec)
    st = ctx.structure
    info = _Groups(ctx, name_patterns(groups, f"{spec}: groups"), scope, float(max_fraction), spec, only, lossy)
    b = ctx.b
    if not any(info.eligible):  # nothing may be removed (e.g. a model whose only group is its output)
        return b.const(torch.ones(st.num_units, dtype=torch.bool), "keep all")
    if isinstance(amount, int):
        for d, n in info.domain_sizes().items():
            if amount > n:
                where = {"local": f"group {st.groups[info.domain.index(d)].name!r}", "global": "all eligible groups",
                         "isomorphic": f"isomorphic class of {st.groups[info.domain.index(d)].name!r}"}[scope]
                raise SpecError(f"{spec}: amount={amount} should be smaller than the number of units in {where} ({n})")
    ties = TieProgram(ctx)
    if ties.any:
        score = ties.shared_score(score)
    gid = b.const(info.gid, "unit_group_ids")
    ends = ctx.group_ends()
    elig_g = b.const(torch.tensor(info.eligible, dtype=torch.bool), "eligible_groups")
    elig_u = b.take(elig_g, gid)
    count = ctx.params_per_unit()
    # a NaN score (a NaN weight) ranks nowhere: such a unit is kept, never removed as if it were small
    has = b.logical_and(b.gt(count, 0), b.logical_not(b.emit("ne", score, score)))
    dead = b.logical_and(has, b.eq(b.unit_reduce("nnz", 0.0), 0))
    cls = b.where(has, b.where(dead, 0, 1), 2)  # 0 already pruned, 1 live, 2 no element (after filters) or NaN: kept
    first = ties.order if ties.any else None
    r = b.sub(_rank(b, score, b.add(b.mul(gid, 3), cls), first), b.const(info.unit_start, "unit_group_start"))
    live = b.eq(cls, 1)
    live_g = b.segment_sum_sorted(b.to_long(live), ends)
    dead_g = b.segment_sum_sorted(b.to_long(dead), ends)
    caps = b.const(torch.tensor(info.caps), "group_caps")
    if scope == "local":
        room = b.maximum(b.sub(caps, dead_g), 0)
        new_g = b.emit("minimum", _count(b, live_g, amount), room)
    else:
        cand = b.logical_and(b.logical_and(live, elig_u), b.lt(r, b.take(caps, gid)))
        if normalize == "mean":  # in float64: group totals come from one cumulative sum over all units
            s64 = b.to_float64(score)
            total = b.segment_sum_sorted(b.where(b.logical_and(live, elig_u), s64, 0.0), ends)
            mean = b.take(b.div(total, b.maximum(live_g, 1)), gid)
            inf = b.const(torch.tensor(math.inf, dtype=torch.float64), "inf")
            ok = b.logical_and(b.gt(mean, 0), b.lt(mean, inf))  # e.g. +inf scores for "never first": raw
            score = b.where(ok, b.div(s64, mean), s64)
        dom_g = torch.tensor(info.domain)
        order = torch.argsort(dom_g, stable=True)
        n_dom = int(dom_g.max()) + 1
        dom_ends = torch.cumsum(torch.bincount(dom_g, minlength=n_dom), 0)
        live_elig = b.mul(live_g, b.to_long(elig_g))
        live_d = b.segment_sum_sorted(b.take(live_elig, b.const(order, "groups_by_domain")), b.const(dom_ends, "ends"))
        dom_u = b.const(dom_g[info.gid], "unit_domain")
        units_per_dom = torch.bincount(dom_g[info.gid], minlength=n_dom)
        dom_start = (torch.cumsum(units_per_dom, 0) - units_per_dom)[dom_g[info.gid]]
        rd = b.sub(_rank(b, score, b.add(b.mul(dom_u, 2), b.to_long(b.logical_not(cand))), first),
                   b.const(dom_start, "unit_domain_start"))
        sel = b.logical_and(cand, b.lt(rd, b.take(_count(b, live_d, amount), dom_u)))
        new_g = b.segment_sum_sorted(b.to_long(sel), ends)
    if round_to > 1:
        avail = b.sub(b.const(torch.tensor(info.sizes), "group_sizes"), dead_g)
        left = b.sub(avail, new_g)
        up = b.mul(b.to_long(b.emit("ceil", b.div(b.to_float64(left), float(round_to)))), round_to)
        new_g = b.sub(avail, b.emit("minimum", up, avail))
    pruned = b.logical_and(elig_u, b.lt(r, b.take(b.add(dead_g, new_g), gid)))
    if ties.any:
        pruned = ties.whole(pruned)
    return b.logical_not(pruned)


def _param_outputs(ctx: Context, keep: Var) -> dict[str, Var]:
    """Element masks of every parameter from a unit keep-vector (all slices, regardless of filters)."""
    b, st = ctx.b, ctx.structure
    n = st.num_units
    ext = b.cat(keep, b.const(torch.ones(1, dtype=torch.bool), "true"))
    by_param: dict[str, list[tuple[Slice, int]]] = {}
    for g in st.groups:
        for s in g.slices:
            by_param.setdefault(s.param, []).append((s, st.offsets[g.name]))
    out: dict[str, Var] = {}
    for p in st.params:
        items = by_param.get(p.name)
        if not items:
            continue
        m = None
        for s, off in items:
            idx, view = slice_lookup(s, p.shape, off, n)
            v = b.reshape(b.take(ext, b.const(idx, f"units of {p.name}[{s.axis}]")), tuple(view))
            m = v if m is None else b.logical_and(m, v)
        out[p.name] = b.emit("expand", m, shape=tuple(p.shape))
    return out


def _with_params(ctx: Context, keep: Var, per_param: bool, spec: str) -> Var | dict[str, Var]:
    if not per_param:
        return keep
    params = _param_outputs(ctx, keep)
    if "units" in params:
        raise SpecError(f"{spec}: a parameter is named 'units', which collides with the unit mask output")
    return {"units": keep, **params}


def _pairs(values: Any) -> list[tuple[str, Any]]:
    return list(values.items()) if isinstance(values, dict) else list(values)


# ------------------------------------------------------------------------------------ unit scores
@define_spec("unit_linf")
def unit_linf(ctx: Context) -> Var:
    """Max |w| over every coupled element of each unit, `[num_units]` (0 for a unit without elements).

    Dense, no scatter: each parameter is reduced with `amax` to its sliced axes, and the per-unit maximum
    over the concatenated slice vectors is one fixed-shape gather + `amax` per distinct number of entries
    per unit (a handful per model), then one gather back into unit order.
    """
    b, st = ctx.b, ctx.structure
    n = st.num_units
    by_param: dict[str, list[tuple[Slice, int]]] = {}
    for g in st.groups:
        for s in ctx.slices[g.name]:
            by_param.setdefault(s.param, []).append((s, st.offsets[g.name]))
    vectors: list[Var] = []
    index_parts: list[torch.Tensor] = []
    for p in st.params:
        items = by_param.get(p.name)
        if not items:
            continue
        axes = sorted({s.axis for s, _ in items} | {s.group_axis for s, _ in items if s.groups > 1})
        if len(axes) > 2:
            raise StructureError(f"parameter {p.name!r} is sliced on {len(axes)} axes; at most two are supported")
        v = b.abs(b.emit("acc", b.param(p.name)))
        dims = tuple(d for d in range(len(p.shape)) if d not in axes)
        r = b.emit("amax", v, dims=dims) if dims else v
        for s, off in items:
            if len(axes) == 1:
                vec = r
            elif s.groups == 1:
                vec = b.emit("amax", r, dims=(1 - axes.index(s.axis),))
            else:
                rt = r if axes.index(s.axis) == 1 else b.emit("permute", r, dims=(1, 0))
                blocks = b.reshape(rt, (s.groups, p.shape[s.group_axis] // s.groups, p.shape[s.axis]))
                vec = b.reshape(b.emit("amax", blocks, dims=(1,)), (-1,))
            vectors.append(vec)
            index_parts.append(torch.from_numpy(s.unit_ids(off, -1)))
    index = torch.cat(index_parts) if index_parts else torch.zeros(0, dtype=torch.long)
    valid = index >= 0
    if not bool(valid.any()):  # no element belongs to any unit (e.g. everything filtered away)
        return b.const(torch.zeros(n), "zeros")
    allv = b.cat(*vectors)
    units = index[valid]
    positions = torch.arange(index.numel())[valid]
    order = torch.argsort(units, stable=True)
    units, positions = units[order], positions[order]
    counts = torch.bincount(units, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    parts, placed = [], []
    for c in sorted(set(counts.tolist()) - {0}):
        us = (counts == c).nonzero().flatten()
        pos = positions[(starts[us].unsqueeze(1) + torch.arange(c)).reshape(-1)]
        gathered = b.reshape(b.take(allv, b.const(pos, f"entries of units with {c}")), (us.numel(), c))
        parts.append(b.emit("amax", gathered, dims=(1,)))
        placed.append(us)
    flat = b.cat(*parts)
    where_is = torch.zeros(n, dtype=torch.long)
    where_is[torch.cat(placed)] = torch.arange(sum(u.numel() for u in placed))
    out = b.take(flat, b.const(where_is, "unit_positions"))
    return b.where(b.const(counts > 0, "units_with_entries"), out, 0.0)


def norm_score(ctx: Context, n: Any, spec: str) -> Var:
    b = ctx.b
    if n in (2, 2.0):
        return b.safe_sqrt(b.unit_reduce("sumsq"))
    if n in (1, 1.0):
        return b.unit_reduce("abssum")
    if n in ("inf", float("inf")):
        return ctx.dep("unit_linf")
    raise SpecError(f"{spec}: n must be 1, 2 or inf (float('inf') or 'inf'), got {n!r}")


_STRUCTURED_DOC = """
    `amount`: int (units to remove) or float (fraction of the units that remain, torch's rounding).
    `scope`: "local" (every eligible group loses `amount` of its own units), "global" (one ranking over all
    eligible groups), "isomorphic" (one ranking per class of groups with the same structure, e.g. every ViT
    MLP). `groups`: fnmatch patterns of the groups to consider (default every prunable group; groups that
    are not prunable are never touched). `max_fraction`: at most this fraction of a group's units is removed
    (already-zero units count), and a group always keeps one unit (default `wtcore.policy`: 0.9 for a global
    or isomorphic scope, 1.0 for local). `round_to`: the units a group keeps are rounded *up* to a multiple of
    `round_to` (where its live units allow). `normalize="mean"` (the default; None ranks raw scores) divides
    scores by their group's mean over live units before a global/isomorphic ranking. `per_param=True` also outputs
    the element mask of every parameter, keyed by name, next to `"units"`.

    Masks are ones physical pruning carries out with the same output: units tied by a grouped convolution
    (`unit_ties`) are ranked by their mean score and removed together (a tie cut by the count stays, so
    counts round down to whole ties), and groups whose units a normalization mixes (`UnitGroup.lossy`: a
    LayerNorm/RMSNorm/GroupNorm over them) are left alone unless `lossy=True`."""


# ------------------------------------------------------------------------------------ structured
@define_spec("ln_structured", outputs=mask_outputs)
def ln_structured(
    ctx: Context, amount: Any = None, n: Any = 2, scope: str = "local", groups: Any = None,
    max_fraction: float | None = None, round_to: int = 1, normalize: str | None = DEFAULT_NORMALIZE,
    per_param: bool = False, lossy: bool = False,
) -> Var | dict[str, Var]:
    """Keep-mask removing the units of smallest L`n` norm (over every coupled slice), `[num_units]` bool."""
    keep = _structured_keep(
        ctx, norm_score(ctx, n, "ln_structured"), "ln_structured", amount=amount, scope=scope, groups=groups,
        max_fraction=max_fraction, round_to=round_to, normalize=normalize, lossy=lossy,
    )
    return _with_params(ctx, keep, per_param, "ln_structured")


@define_spec("random_structured", outputs=mask_outputs)
def random_structured(
    ctx: Context, amount: Any = None, seed: int = 0, scope: str = "local", groups: Any = None,
    max_fraction: float | None = None, round_to: int = 1, per_param: bool = False, lossy: bool = False,
) -> Var | dict[str, Var]:
    """Keep-mask removing units at random: each unit gets `torch.rand` from a generator seeded with `seed`
    (fixed at compile time, so every call gives the same mask) and the lowest go, like torch's
    `random_structured`."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"random_structured: seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    score = ctx.b.const(torch.rand(ctx.structure.num_units, generator=gen), f"random scores (seed {seed})")
    keep = _structured_keep(
        ctx, score, "random_structured", amount=amount, scope=scope, groups=groups, max_fraction=max_fraction,
        round_to=round_to, normalize=None, lossy=lossy,
    )
    return _with_params(ctx, keep, per_param, "random_structured")


@define_spec("importance", outputs=mask_outputs)
def importance(
    ctx: Context, scores: Any = None, amount: Any = None, scope: str = "local", groups: Any = None,
    max_fraction: float | None = None, round_to: int = 1, normalize: str | None = DEFAULT_NORMALIZE,
    per_param: bool = False, lossy: bool = False,
) -> Var | dict[str, Var]:
    """Keep-mask from user scores per unit (lowest removed first): `scores` is a `[num_units]` tensor or
    `(group, values)` pairs (groups left out are not considered). A dict must be passed as hashable pairs,
    e.g. `tuple((k, tuple(v)) for k, v in d.items())`, or converted with `wtcore.masking.as_unit_vector`."""
    if scores is None:
        raise SpecError("importance needs scores= (a [num_units] tensor or (group, values) pairs)")
    vec = as_unit_vector(ctx.structure, scores, torch.float64, fill=math.inf, what="importance: scores")
    only = None if isinstance(scores, torch.Tensor) else {name for name, _ in _pairs(scores)}
    keep = _structured_keep(
        ctx, ctx.b.const(vec, "importance scores"), "importance", amount=amount, scope=scope, groups=groups,
        max_fraction=max_fraction, round_to=round_to, normalize=normalize, only=only, lossy=lossy,
    )
    return _with_params(ctx, keep, per_param, "importance")


for _f in (ln_structured, random_structured, importance):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _STRUCTURED_DOC


@define_spec("custom", outputs=mask_outputs)
def custom(ctx: Context, keep: Any = None, per_param: bool = False) -> Var | dict[str, Var]:
    """A user keep-mask per unit (`[num_units]` bool tensor or `(group, bools)` pairs; groups left out are
    kept), combined with what earlier masks removed: units of prunable groups that are exactly zero stay
    removed."""
    if keep is None:
        raise SpecError("custom needs keep= (a [num_units] bool tensor or (group, bools) pairs)")
    b = ctx.b
    vec = as_unit_vector(ctx.structure, keep, torch.bool, fill=True, what="custom: keep")
    ties = unit_ties(ctx.structure)
    split = (vec != vec[ties]).nonzero().flatten()
    if split.numel():
        u = int(split[0])
        g = next(g for g in ctx.structure.groups if ctx.structure.offsets[g.name] <= u < ctx.structure.offsets[g.name]
                 + g.size)
        raise SpecError(
            f"custom: keep removes unit {u - ctx.structure.offsets[g.name]} of group {g.name!r} but not the units "
            "a grouped convolution ties to it (the same in-group position in every conv group, which physical "
            "pruning removes together); remove whole ties (wtcore.realizable.unit_ties)"
        )
    user = b.const(vec, "user mask")
    dead = b.logical_and(b.gt(ctx.params_per_unit(), 0), b.eq(b.unit_reduce("nnz", 0.0), 0))
    out = b.logical_and(user, b.logical_not(b.logical_and(dead, ctx.prunable_units())))
    return _with_params(ctx, out, per_param, "custom")


# ------------------------------------------------------------------------------------ unstructured
def _selected_params(ctx: Context, params: Any, spec: str, default: Any) -> list[str]:
    """Parameters kept by the compile filters (`include`/`ignore`), then matched by `params` patterns over
    canonical names and aliases (default: `default(param)`)."""
    pats = name_patterns(params, f"{spec}: params")
    out = []
    for p in ctx.structure.params:
        if not ctx.selects(p.name, p.module):
            continue
        names = (p.name, *p.aliases)
        if (pats is None and default(p)) or (pats is not None and any(fnmatch.fnmatchcase(n, q) for n in names
                                                                      for q in pats)):
            out.append(p.name)
    if not out:
        raise SpecError(f"{spec}: no parameter selected (params={params!r})")
    return out


def _weights(p: Any) -> bool:
    return len(p.shape) >= 2


def _prune_lowest(b: Any, key: Var, dead: Var, numel: int, amount: int | float, first: Var | None = None) -> Var:
    """Element keep-mask of a flat tensor: remove the already-dead entries and then `amount` of the others in
    ascending `key` order (`first` = a precomputed ordering of key, dead entries are moved in front)."""
    ndead = b.sum(b.to_long(dead), None)
    live = b.sub(numel, ndead)
    k = _count(b, live, amount)
    p1 = first if first is not None else b.emit("argsort", key, dim=0)
    p = b.take(p1, b.emit("argsort", b.take(b.to_long(b.logical_not(dead)), p1), dim=0))
    rank = b.emit("argsort", p, dim=0)
    return b.logical_not(b.lt(rank, b.add(ndead, k)))


@define_spec("l1_unstructured", outputs={"*": "elements"})
def l1_unstructured(ctx: Context, amount: Any = None, params: Any = None) -> dict[str, Var]:
    """Element keep-masks removing the `amount` smallest |w| of each parameter (torch's `l1_unstructured`),
    relative to the entries that are not already zero. `params`: fnmatch patterns (default: every parameter
    with at least two dimensions)."""
    amount = _need_amount(amount, "l1_unstructured")
    b, out = ctx.b, {}
    for name in _selected_params(ctx, params, "l1_unstructured", _weights):
        shape = ctx.structure.param_map[name].shape
        numel = _check_count(amount, name, shape, "l1_unstructured")
        a = b.reshape(b.abs(b.param(name)), (-1,))
        keep = _prune_lowest(b, a, b.eq(a, 0), numel, amount)
        out[name] = b.reshape(keep, tuple(shape))
    return out


def _check_count(amount: int | float, name: str, shape: tuple[int, ...], spec: str) -> int:
    """The number of elements of `name`; an int `amount` (a count) may not exceed it."""
    numel = math.prod(shape)
    if isinstance(amount, int) and amount > numel:
        raise SpecError(f"{spec}: amount={amount} should be smaller than the number of elements of {name!r} ({numel})")
    return numel


@define_spec("random_unstructured", outputs={"*": "elements"})
def random_unstructured(ctx: Context, amount: Any = None, seed: int = 0, params: Any = None) -> dict[str, Var]:
    """Element keep-masks removing random entries, relative to the entries not already zero. One generator
    seeded with `seed` draws `torch.rand(shape)` per parameter in structure order (at compile time) and the
    highest draws go, as in torch's `random_unstructured` (same mask as torch after `torch.manual_seed(seed)`
    for a single float32 tensor)."""
    amount = _need_amount(amount, "random_unstructured")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"random_unstructured: seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    b, out = ctx.b, {}
    for name in _selected_params(ctx, params, "random_unstructured", _weights):
        shape = ctx.structure.param_map[name].shape
        numel = _check_count(amount, name, shape, "random_unstructured")
        draws = torch.rand(shape, generator=gen).reshape(-1)
        first = b.const(torch.argsort(-draws, stable=True), f"random order of {name}")
        w = b.reshape(b.param(name), (-1,))
        keep = _prune_lowest(b, w, b.eq(w, 0), numel, amount, first=first)
        out[name] = b.reshape(keep, tuple(shape))
    return out


def _is_nm_weight(p: Any) -> bool:
    t = p.module_type
    return len(p.shape) >= 2 and (t.endswith("Linear") or t.startswith("Conv"))


@define_spec("nm", outputs={"*": "elements"})
def nm(
    ctx: Context, n: int = 2, m: int = 4, block_shape: Any = None, params: Any = None, indivisible: str = "skip"
) -> dict[str, Var]:
    """N:M element keep-masks: in every block of `m` weights along the input axis, the `n` smallest |w| are
    removed and the `m - n` largest kept (2:4 = two zeros in every four).

    Blocks are laid out as in torch.ao's `WeightNormSparsifier` (`sparse_block_shape=(rows, cols)` with
    `rows * cols == m`, default `(1, m)`; `n` is its `zeros_per_block`) on the 2-D view of each weight:
    a Linear's `[out, in]`, a conv's `[kh * kw * out, in]` (blocks along input channels at each kernel tap,
    the layout of 2:4 sparse tensor-core kernels). `indivisible`: what to do with a weight whose view is not
    a whole number of blocks: "skip" (leave it dense, e.g. a depthwise conv with one input per group),
    "pad" (torch.ao's padding: a partial block loses its min(n, size) smallest), or "error".
    `params`: fnmatch patterns (default: weights of Linear and conv layers).
    """
    for v, what in ((n, "n"), (m, "m")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"nm: {what} must be an int, got {v!r}")
    if not 0 <= n <= m or m < 1:
        raise SpecError(f"nm: need 0 <= n <= m and m >= 1, got n={n}, m={m}")
    bs = (1, m) if block_shape is None else tuple(block_shape)
    if len(bs) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in bs) or bs[0] * bs[1] != m:
        raise SpecError(f"nm: block_shape must be two positive ints whose product is m={m}, got {block_shape!r}")
    if indivisible not in ("skip", "pad", "error"):
        raise SpecError(f"nm: indivisible must be 'skip', 'pad' or 'error', got {indivisible!r}")
    b, out = ctx.b, {}
    for name in _selected_params(ctx, params, "nm", _is_nm_weight):
        p = ctx.structure.param_map[name]
        shape = p.shape
        if len(shape) < 2:
            raise SpecError(f"nm: {name!r} has shape {shape}; N:M masks need a weight with an input axis")
        in_axis = 0 if p.module_type.startswith("ConvTranspose") else 1
        out_axis = 1 - in_axis
        perm = (*range(2, len(shape)), out_axis, in_axis)
        permuted = tuple(shape[d] for d in perm)
        rows, cols = math.prod(permuted[:-1]), permuted[-1]
        dh, dw = (-rows) % bs[0], (-cols) % bs[1]
        if dh or dw:
            if indivisible == "skip":
                continue
            if indivisible == "error":
                raise SpecError(f"nm: the 2-D view [{rows}, {cols}] of {name!r} is not a whole number of "
                                f"{bs} blocks; pass indivisible='skip' or 'pad'")
        identity = perm == tuple(range(len(shape)))
        a = b.abs(b.param(name))
        a = b.reshape(a if identity else b.emit("permute", a, dims=perm), (rows, cols))
        if dh or dw:
            a = b.emit("pad_inf", a, pad=(0, dw, 0, dh))
        hh, ww = rows + dh, cols + dw
        tiles = b.reshape(a, (hh // bs[0], bs[0], ww // bs[1], bs[1]))
        blocks = b.reshape(b.emit("permute", tiles, dims=(0, 2, 1, 3)), (-1, m))
        rank = b.emit("argsort", b.emit("argsort", blocks, dim=1), dim=1)
        keep = b.ge(rank, n)
        tiles = b.reshape(keep, (hh // bs[0], ww // bs[1], bs[0], bs[1]))
        keep = b.reshape(b.emit("permute", tiles, dims=(0, 2, 1, 3)), (hh, ww))
        if dh or dw:
            keep = b.emit("narrow", b.emit("narrow", keep, dim=0, start=0, length=rows), dim=1, start=0, length=cols)
        inv = tuple(sorted(range(len(perm)), key=lambda i: perm[i]))
        keep = b.reshape(keep, permuted)
        out[name] = keep if identity else b.emit("permute", keep, dims=inv)
    if not out:
        raise SpecError("nm: no selected weight is a whole number of blocks; pass indivisible='pad' or params=")
    return out
