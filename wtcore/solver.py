"""The keep-mask that brings a cost (MACs, BOPs, parameters) to a target, solved exactly from the cost model.

Every cost here is a sum over items (ops, parameters) of `round(weight x prod over axes of active / size)`,
and an axis' active size only falls as units are removed, so the cost is monotone in the set of removed
units. The scope rules of the structured mask specs (`wtcore/specs/masks.py`) order the candidate units:

- each unit gets a *key*, `(rank + 0.5) / live` of its domain (one domain for `scope="global"`, one per group
  for `"local"`, one per class of isomorphic groups for `"isomorphic"`), where `rank` orders the domain's
  candidates by importance (lowest first; ties to the lower unit index) and `live` counts its live units.
  Removing every unit with key <= f is exactly what the mask spec does for `amount=f` (it removes
  `round(f x live)` per domain), so the states of all amounts form one chain: no state is skipped, and ties
  (equal keys, e.g. two local groups of the same size) are removed together, as the mask spec would;
- only masks physical pruning carries out (`wtcore.realizable`, the mask specs' rules): units a grouped
  convolution ties are scored by their mean, ranked next to each other and take effect together (at the key
  of the tie's last member); groups a normalization mixes are not eligible unless `lossy=True`;
- candidates are the live units of eligible groups within their group's cap (`max_fraction`, `min_kept` units kept,
  already-zero units count towards it);
- with `round_to`, a group's removals take effect in blocks (the units it keeps are rounded up to a
  multiple), so each unit takes effect at the key of the unit that completes its block.

The solver sorts the units by effective key, builds the per-axis decrements of each removal from the cost
specs' own axis tables, and evaluates the cost for every prefix at once (cumulative sums, in chunks of
bounded memory, float64 with the specs' rounding), then takes the smallest prefix that meets the target:
no trial masks, no search over amounts. Units that are already exactly zero count as removed from the start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .compiler import compile as compile_program
from .errors import SpecError, WtError
from .ir import Structure
from .masking import param_masks
from .policy import (
    DEFAULT_NORMALIZE,
    DEFAULT_SCOPE,
    check_normalize,
    default_max_fraction,
    normalize_scores,
    warn_narrow,
)
from .realizable import Ties, eligible_groups, group_caps, tie_mean, ties_of, whole_ties
from .spec import Spec
from .specs.costs import axis_desc, axis_table, bits_vector, param_axes  # the cost specs' own semantics
from .specs.masks import SCOPES, isomorphism_key, name_patterns

__all__ = ["METRICS", "Solution", "TargetError", "metric_ratio", "solve", "solve_keep"]

#: Costs a target can be set on.
METRICS = ("macs", "bops", "params")

_CHUNK_ENTRIES = 1 << 22  # prefix rows x axes evaluated at once (float64: 32 MiB)


class TargetError(WtError):
    """A cost target that the scope rules cannot reach (caps, unprunable groups), or an invalid target."""


@dataclass(frozen=True)
class Solution:
    """A solved keep-mask and the cost it gives.

    `keep`: `[num_units]` bool (False: removed, including units that were already zero in eligible groups);
    `ratio`: the metric of the keep-mask / `baseline`; `before`: the ratio of the parameters as given;
    `best`: the lowest ratio the scope rules allow (every candidate removed); `removed`: units newly removed;
    `selected`: candidates the ranking took before `round_to` rounding (for `scope="global"`, the `amount` of
    the `importance` mask spec that gives the same mask).
    """

    keep: torch.Tensor
    metric: str
    target: float
    ratio: float
    before: float
    best: float
    baseline: float
    removed: int
    selected: int


# ============================================================================================ validation
def _check_options(structure: Structure, metric: str, target: Any, scope: str, max_fraction: Any,
                   round_to: Any) -> tuple[float, float, int]:
    if metric not in METRICS:
        raise SpecError(f"solve_keep: metric must be one of {METRICS}, got {metric!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) <= 1.0:
        raise TargetError(f"solve_keep: target must be a fraction of the baseline {metric} in [0, 1], got {target!r}")
    if scope not in SCOPES:
        raise SpecError(f"solve_keep: scope must be one of {SCOPES}, got {scope!r}")
    mf = default_max_fraction(scope) if max_fraction is None else max_fraction
    if isinstance(mf, bool) or not isinstance(mf, (int, float)) or not 0.0 <= float(mf) <= 1.0:
        raise SpecError(f"solve_keep: max_fraction must be a number in [0, 1] or None, got {max_fraction!r}")
    rt = 1 if round_to is None else round_to
    if isinstance(rt, bool) or not isinstance(rt, int) or rt < 1:
        raise SpecError(f"solve_keep: round_to must be a positive int or None, got {round_to!r}")
    if metric in ("macs", "bops") and not structure.ops:
        raise TargetError(f"solve_keep: metric {metric!r} needs cost ops; trace the model with costs (the default)")
    return float(target), float(mf), rt


# ============================================================================================ unit state
def unit_state(structure: Structure, params: Mapping[str, torch.Tensor],
               importance: Any, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores float64, dead bool, has-elements bool) per unit, from one program call."""
    specs: list[Any] = ["unit_active", "params_per_unit"]
    key = None
    if isinstance(importance, (str, Spec)) and importance != "random":
        spec = Spec(importance) if isinstance(importance, str) else importance
        key = spec.key
        specs.append(spec)
    elif not isinstance(importance, (str, torch.Tensor)):
        raise SpecError(f"solve_keep: importance must be a spec name, a Spec, 'random' or a [num_units] tensor,"
                        f" got {type(importance).__name__}")
    with torch.no_grad():
        out = compile_program(structure, specs)(params)
    n = structure.num_units
    active = out["unit_active"].detach().cpu().numpy().astype(bool)
    has = out["params_per_unit"].detach().cpu().numpy() > 0
    if key is not None:
        if key not in out:
            raise SpecError(f"solve_keep: importance spec {key!r} has several outputs "
                            f"({sorted(k for k in out if k.startswith(key + '/'))[:4]}); pick a per-unit score spec")
        scores = out[key]
    elif isinstance(importance, torch.Tensor):
        scores = importance
    else:
        scores = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)))
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise SpecError(f"solve_keep: importance scores must have shape [num_units] = [{n}], got {shape}")
    s = scores.detach().to("cpu", torch.float64).numpy()
    if np.isnan(s).any():
        raise SpecError(f"solve_keep: importance scores contain NaN (unit {int(np.isnan(s).argmax())}); "
                        "fix the scores (e.g. torch.nan_to_num)")
    return s, ~active & has, has


# ============================================================================================ ordering
def effective_keys(structure: Structure, scores: np.ndarray, dead: np.ndarray, has: np.ndarray, *, scope: str,
                   max_fraction: float, round_to: int, groups: tuple[str, ...] | None,
                   normalize: str | None = None, lossy: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: the effective key (+inf where it is never removed), its group's eligibility, the key before
    `round_to` blocks. `normalize` (`wtcore.policy`) applies to the ranking across groups. Ties and eligibility
    are `wtcore.realizable`'s, as in the mask specs: a tie is scored by its mean and takes effect whole."""
    st = structure
    sizes = np.array([g.size for g in st.groups], dtype=np.int64)
    gid = np.repeat(np.arange(len(st.groups)), sizes)
    ties = ties_of(st)
    pos = ties.position.numpy()  # tie-break: tied units next to each other, else the lower index first
    if ties.any:
        scores = tie_mean(torch.from_numpy(scores), ties).numpy()
    elig_g = np.array(eligible_groups(st, groups, "solve_keep", lossy=lossy), dtype=bool)
    caps = np.array(group_caps(st, elig_g.tolist(), max_fraction), dtype=np.int64)
    cls = np.where(has, np.where(dead, 0, 1), 2)  # 0 already zero, 1 live, 2 no element: kept
    live = cls == 1
    # rank inside the group: already-zero units first, then live units by score (ties: lower position)
    order = np.lexsort((pos, scores, cls, gid))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    r = np.empty(st.num_units, dtype=np.int64)
    r[order] = np.arange(st.num_units) - starts[gid[order]]
    cand = live & elig_g[gid] & (r < caps[gid])
    if scope == "local":
        dom_g = np.arange(len(st.groups))
    elif scope == "global":
        dom_g = np.zeros(len(st.groups), dtype=np.int64)
    else:
        keys: dict[Any, int] = {}
        dom_g = np.array([keys.setdefault(isomorphism_key(st, g.name), len(keys)) for g in st.groups])
    dom = dom_g[gid]
    if scope != "local":
        scores = normalize_scores(scores, gid, live & elig_g[gid], normalize)
    live_d = np.bincount(dom, weights=(live & elig_g[gid]).astype(np.float64), minlength=int(dom_g.max()) + 1)
    # rank among the domain's candidates by score (ties: lower position), as the mask specs rank
    dorder = np.lexsort((pos, scores, ~cand, dom))
    dstart = np.searchsorted(dom[dorder], np.arange(len(live_d)))
    rd = np.empty(st.num_units, dtype=np.int64)
    rd[dorder] = np.arange(st.num_units) - dstart[dom[dorder]]
    key = np.full(st.num_units, np.inf)
    key[cand] = (2.0 * rd[cand] + 1.0) / (2.0 * np.maximum(live_d[dom[cand]], 1.0))
    eff = key
    if round_to > 1:
        avail = sizes - np.bincount(gid, weights=dead, minlength=len(sizes)).astype(np.int64)
        eff = _round_keys(key, cand, gid, avail, round_to)
    if ties.any:  # a tie goes when its last member would: the mask specs remove only whole ties
        tie_key = _tie_max(np.where(dead & elig_g[gid], -np.inf, eff), ties)
        # already-zero members go with their tie's live members (physical pruning removes the tie then)
        eff = np.where(cand | (dead & elig_g[gid] & (tie_key > -np.inf)), tie_key, np.inf)
    return eff, elig_g[gid], key


def _tie_max(key: np.ndarray, ties: Ties) -> np.ndarray:
    """Each unit's key replaced by the largest key of its tie."""
    order = ties.order.numpy()
    starts = np.concatenate([[0], ties.ends.numpy()[:-1]])
    return np.maximum.reduceat(key[order], starts)[ties.seg.numpy()]


def _round_keys(key: np.ndarray, cand: np.ndarray, gid: np.ndarray, avail: np.ndarray, round_to: int) -> np.ndarray:
    """With `round_to`, a group that removes `i` candidates keeps `avail - i` rounded up to a multiple, so its
    `j`-th removal takes effect when `i` first reaches a block end (`(avail - i) % round_to == 0`)."""
    out = np.full_like(key, np.inf)
    for g in np.unique(gid[cand]):
        units = np.flatnonzero(cand & (gid == g))
        units = units[np.argsort(key[units], kind="stable")]
        c = units.size
        i = np.arange(1, c + 1)
        ends = i[(avail[g] - i) % round_to == 0]  # block ends (1-based counts) reachable among the candidates
        pos = np.searchsorted(ends, i)  # first block end >= j
        ok = pos < ends.size
        out[units[ok]] = key[units[ends[pos[ok]] - 1]]
    return out


def removable(structure: Structure, dead: np.ndarray) -> np.ndarray:
    """The `dead` units that physical pruning removes, as the cost specs count them (`removable_f64`): those of
    prunable groups, except the first unit of a group whose units are all dead, in whole ties."""
    sizes = np.array([g.size for g in structure.groups], dtype=np.int64)
    gid = np.repeat(np.arange(len(sizes)), sizes)
    prun = np.array([g.prunable for g in structure.groups], dtype=bool)
    out = dead & prun[gid]
    starts = np.cumsum(sizes) - sizes
    all_gone = np.bincount(gid, weights=out, minlength=len(sizes)) == sizes
    firsts = starts[all_gone & (sizes > 0)]
    out[firsts] = False
    return whole_ties(out, ties_of(structure))


# ============================================================================================ cost of every prefix
@dataclass(frozen=True)
class _Cost:
    """Items (ops or parameters) with their axes, as flat tables: `weight` x prod(active / size), rounded,
    times `mult`."""

    units: torch.Tensor  # int64 [E] unit of each axis entry
    counts: torch.Tensor  # float64 [E] positions of the axis that follow that unit
    entry_axis: torch.Tensor  # int64 [E]
    lengths: torch.Tensor  # float64 [A]
    item_axes: torch.Tensor  # int64 [I, W] axis of each item, A (= padding, ratio 1) where it has fewer
    weight: torch.Tensor  # float64 [I]
    mult: torch.Tensor  # float64 [I]
    baseline: float


def _cost_model(structure: Structure, metric: str, weight_bits: Any, act_bits: Any) -> _Cost:
    if metric == "params":
        items = [param_axes(structure, p.name) for p in structure.params]
        labels = [f"parameter {p.name!r}" for p in structure.params]
        weight = [float(p.numel) for p in structure.params]
        mult = [1.0] * len(weight)
        baseline = float(sum(weight))
    else:
        items = [[axis_desc(a) for a in o.axes] for o in structure.ops]
        labels = [f"op {o.name!r}" for o in structure.ops]
        weight = [float(o.macs) for o in structure.ops]
        base = np.array([float(o.baseline_macs) for o in structure.ops])
        if metric == "bops":
            bits = (bits_vector(structure, weight_bits, "solve_keep: weight_bits")
                    * bits_vector(structure, act_bits, "solve_keep: act_bits"))
            mult, baseline = bits.tolist(), float(base.sum() * 1024.0)
        else:
            mult, baseline = [1.0] * len(weight), float(base.sum())
    if baseline <= 0:
        raise TargetError(f"solve_keep: the baseline {metric} of this structure is 0; nothing to bring to a target")
    flat = [a for axes in items for a in axes]
    flat_labels = [f"{lab} axis {k}" for lab, axes in zip(labels, items) for k in range(len(axes))]
    t = axis_table(structure, flat, flat_labels)
    n_axes = len(flat)
    width = max((len(a) for a in items), default=0)
    item_axes = torch.full((len(items), max(width, 1)), n_axes, dtype=torch.long)
    k = 0
    for i, axes in enumerate(items):
        item_axes[i, : len(axes)] = torch.arange(k, k + len(axes))
        k += len(axes)
    per_axis = torch.diff(t.ends, prepend=torch.zeros(1, dtype=torch.long))
    entry_axis = torch.repeat_interleave(torch.arange(n_axes), per_axis)
    return _Cost(t.units, t.counts, entry_axis, t.lengths, item_axes, torch.tensor(weight, dtype=torch.float64),
                 torch.tensor(mult, dtype=torch.float64), baseline)


def _totals(c: _Cost, active: torch.Tensor) -> torch.Tensor:
    """Cost of each row of active axis sizes `[R, A]`, computed as the cost specs do (same operation order)."""
    ratio = active / c.lengths.clamp(min=1.0)
    padded = torch.cat([ratio, torch.ones(ratio.shape[0], 1, dtype=torch.float64)], 1)
    m = padded[:, c.item_axes]  # [R, I, W]
    prod = m[:, :, 0]
    for j in range(1, m.shape[2]):
        prod = prod * m[:, :, j]
    return (torch.round(c.weight * prod) * c.mult).sum(1)


def _prefix_totals(c: _Cost, inactive0: np.ndarray, order: np.ndarray, ends: np.ndarray,
                   stop_at: float | None) -> tuple[float, np.ndarray]:
    """Cost with `inactive0` removed, and after removing `order[:e]` for every `e` in `ends` (ascending; the
    scan stops at the first chunk whose cost reaches `stop_at`; later entries are NaN)."""
    n_axes = c.lengths.numel()
    hit0 = torch.from_numpy(inactive0)[c.units].to(torch.float64) * c.counts
    active0 = c.lengths - torch.zeros(n_axes, dtype=torch.float64).index_add(0, c.entry_axis, hit0)
    before = float(_totals(c, active0[None])[0])
    out = np.full(len(ends), np.nan)
    if not len(ends):
        return before, out
    # per-unit entry lists (CSR over the axis tables)
    by_unit = torch.argsort(c.units, stable=True)
    n_units = len(inactive0)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long),
                     torch.cumsum(torch.bincount(c.units, minlength=n_units), 0)])
    o = torch.from_numpy(order)
    chunk = max(1, _CHUNK_ENTRIES // max(n_axes, 1))
    carry = torch.zeros(n_axes, dtype=torch.float64)
    e_t = torch.from_numpy(ends)
    lo = 0
    while lo < len(order):
        hi = min(lo + chunk, len(order))
        u = o[lo:hi]
        lens = ptr[u + 1] - ptr[u]
        rows = torch.repeat_interleave(torch.arange(hi - lo), lens)
        first = torch.repeat_interleave(ptr[u], lens)
        within = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        ent = by_unit[first + within]
        delta = torch.zeros(hi - lo, n_axes, dtype=torch.float64)
        delta.index_put_((rows, c.entry_axis[ent]), c.counts[ent], accumulate=True)
        cum = torch.cumsum(delta, 0) + carry
        carry = cum[-1].clone()
        sel = ((e_t > lo) & (e_t <= hi)).nonzero().flatten()
        if sel.numel():
            tot = _totals(c, active0 - cum[e_t[sel] - 1 - lo])
            out[sel.numpy()] = tot.numpy()
            if stop_at is not None and bool((tot / c.baseline <= stop_at).any()):
                break
        lo = hi
    return before, out


# ============================================================================================ side effects
def own_elements(structure: Structure, params: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Per unit: whether it has a nonzero element that no other unit is coupled to (an element of a parameter
    only one slice touches: a bias, a norm entry, a weight sliced on one axis only). Removing other units
    never makes such a unit inactive, so the cost of a removal set is the sum of its own decrements."""
    count: dict[str, int] = {}
    for g in structure.groups:
        for s in g.slices:
            count[s.param] = count.get(s.param, 0) + 1
    groups = tuple(replace(g, slices=tuple(s for s in g.slices if count[s.param] == 1)) for g in structure.groups)
    sub = replace(structure, groups=groups, ops=())
    with torch.no_grad():
        mass = compile_program(sub, ["unit_l1"])({k: params[k] for k in sub.param_map})["unit_l1"]
    return mass.detach().cpu().numpy() > 0


def _program_ratio(structure: Structure, params: Mapping[str, torch.Tensor], metric: str, weight_bits: Any,
                   act_bits: Any) -> Callable[[np.ndarray], float]:
    """The metric ratio, through the cost spec's program, with the units where `removed` is True zeroed."""

    def ratio(removed: np.ndarray) -> float:
        masks = param_masks(structure, torch.from_numpy(~removed))
        zeroed = {k: (v * masks[k].to(v.device) if k in masks else v) for k, v in params.items()}
        return metric_ratio(structure, zeroed, metric, weight_bits, act_bits)

    return ratio


# ============================================================================================ API
def solve(structure: Structure, params: Mapping[str, torch.Tensor], *, target: float, metric: str = "macs",
          importance: str | torch.Tensor | Spec = "unit_l2", scope: str = DEFAULT_SCOPE,
          max_fraction: float | None = None, round_to: int | None = None, seed: int = 0,
          groups: str | Sequence[str] | None = None, weight_bits: Any = 32, act_bits: Any = 32,
          normalize: str | None = DEFAULT_NORMALIZE, warn: bool = True, lossy: bool = False) -> Solution:
    """Like `solve_keep`, returning the keep-mask with the cost it reaches (a `Solution`)."""
    target, mf, rt = _check_options(structure, metric, target, scope, max_fraction, round_to)
    normalize = check_normalize(normalize, "solve_keep")
    scores, dead, has = unit_state(structure, params, importance, seed)
    key, elig, raw = effective_keys(structure, scores, dead, has, scope=scope, max_fraction=mf, round_to=rt,
                                    groups=name_patterns(groups, "solve_keep: groups"), normalize=normalize,
                                    lossy=lossy)
    cost = _cost_model(structure, metric, weight_bits, act_bits)
    gone = removable(structure, dead)
    finite = np.flatnonzero(np.isfinite(key))
    order = finite[np.argsort(key[finite], kind="stable")]
    levels = key[order]
    ends = np.flatnonzero(np.append(levels[1:] != levels[:-1], True)) + 1 if order.size else np.zeros(0, np.int64)
    before, totals = _prefix_totals(cost, gone.copy(), order, ends.astype(np.int64), target)
    ratios = totals / cost.baseline
    best_known = float(ratios[-1]) if ends.size and not np.isnan(ratios[-1]) else None
    hits = np.flatnonzero(ratios <= target)
    if before / cost.baseline <= target:
        n_removed, ratio, selected = 0, before / cost.baseline, 0
    elif hits.size:
        n_removed, ratio = int(ends[hits[0]]), float(ratios[hits[0]])
        selected = int((raw <= levels[n_removed - 1]).sum())
    else:
        n_removed, ratio, selected = -1, math.inf, 0  # out of reach (unless side effects help, below)
    if not (own_elements(structure, params) | dead | ~has).all():
        # some live unit has no nonzero element of its own: removing others may zero it as a side effect, which
        # only lowers the cost. Check the fast answer with the cost program; if it is off, search the same
        # chain of states with the program (the cost stays monotone along it).
        n_removed, ratio, selected, best_known = _exact_on_chain(
            structure, params, metric, weight_bits, act_bits, dead, order, ends, raw, levels, target,
            n_removed, ratio, selected, before / cost.baseline)
    if n_removed < 0:
        best = best_known if best_known is not None else before / cost.baseline
        raise TargetError(
            f"solve_keep: {metric} can go down to {best:.4f} of the baseline with scope={scope!r}, "
            f"max_fraction={mf}, round_to={round_to}, lossy={lossy} (prunable groups only, whole grouped-conv ties); "
            f"the target {target} is out of reach: raise the target or max_fraction, or widen groups="
        )
    removed = dead & elig
    removed[order[:n_removed]] = True
    keep = ~whole_ties(removed, ties_of(structure))  # an already-zero unit tied to kept ones is kept
    if warn:
        warn_narrow(structure, keep)
    if best_known is None:  # the scan stopped early; the full removal's cost is only needed for reports
        best_known = float(_prefix_totals(cost, gone.copy(), order, np.array([order.size]), None)[1][0]
                           / cost.baseline) if order.size else before / cost.baseline
    return Solution(torch.from_numpy(keep), metric, target, ratio, before / cost.baseline, best_known,
                    cost.baseline, n_removed, selected)


def _exact_on_chain(structure: Structure, params: Mapping[str, torch.Tensor], metric: str, weight_bits: Any,
                    act_bits: Any, dead: np.ndarray, order: np.ndarray, ends: np.ndarray, raw: np.ndarray,
                    levels: np.ndarray, target: float, n_removed: int, ratio: float, selected: int,
                    before: float) -> tuple[int, float, int, float]:
    """(removed, ratio, selected, best) on the chain of states, with costs from the cost program."""
    cost_of = _program_ratio(structure, params, metric, weight_bits, act_bits)

    def at(level: int) -> float:  # level -1: nothing removed
        removed = dead.copy()
        if level >= 0:
            removed[order[: ends[level]]] = True
        return cost_of(removed)

    best = at(len(ends) - 1) if len(ends) else before
    if before <= target:
        return 0, before, 0, best
    if n_removed > 0:
        level = int(np.searchsorted(ends, n_removed))
        if at(level) == ratio:  # no side effect at the answer, hence none before it: it is exact
            return n_removed, ratio, selected, best
    if best > target:
        return -1, math.inf, 0, best
    lo, hi = 0, len(ends) - 1  # the first level whose program cost meets the target (monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    n = int(ends[lo])
    return n, at(lo), int((raw <= levels[n - 1]).sum()), best


def solve_keep(structure: Structure, params: Mapping[str, torch.Tensor], *, target: float, metric: str = "macs",
               importance: str | torch.Tensor = "unit_l2", scope: str = DEFAULT_SCOPE,
               max_fraction: float | None = None, round_to: int | None = None, seed: int = 0,
               **options: Any) -> torch.Tensor:
    """bool keep-mask [structure.num_units] that brings `metric` ("macs" | "bops" | "params") to at most
    `target` x its baseline value, removing the least important units first (importance: a spec name whose output is
    per-unit scores, "random", or a [num_units] tensor), within the scope rules of the mask specs.

    Units that are already exactly zero count as removed (and are False in the mask when their group is
    eligible). `max_fraction`/`round_to`/`scope`/`normalize` mean what they mean for `ln_structured`, with the
    defaults of `wtcore.policy` (mean-normalized scores, at most 90% of a group removed by a global ranking;
    a `NarrowGroupWarning` when a group keeps less than 10% of its width, `warn=False` silences it); `seed` seeds
    `importance="random"`. Only masks that physical pruning carries out are chosen (`wtcore.realizable`): units
    a grouped convolution ties go together, scored by their mean, and such a convolution keeps two output channels
    per conv group; groups whose units a normalization mixes (`UnitGroup.lossy`) keep their units unless
    `lossy=True`. Options: `groups` (fnmatch patterns of the groups that may lose units),
    `weight_bits`/`act_bits` (for `metric="bops"`: one int or one per op). The baseline is the dense original
    model's cost (`active_macs/baseline`, `structured_bops/baseline`, `active_params/numel`). Raises
    `TargetError` when the scope rules cannot reach the target.
    """
    return solve(structure, params, target=target, metric=metric, importance=importance, scope=scope,
                 max_fraction=max_fraction, round_to=round_to, seed=seed, **options).keep


def metric_ratio(structure: Structure, params: Mapping[str, torch.Tensor], metric: str = "macs",
                 weight_bits: Any = 32, act_bits: Any = 32) -> float:
    """The cost of `params` (inactive units removed) / its baseline, through the cost specs' programs."""
    if metric not in METRICS:
        raise SpecError(f"metric must be one of {METRICS}, got {metric!r}")
    spec = {"macs": Spec("active_macs"), "params": Spec("active_params"),
            "bops": Spec("structured_bops", weight_bits=weight_bits, act_bits=act_bits)}[metric]
    with torch.no_grad():
        out = compile_program(structure, [spec])(params)
    if metric == "macs":
        return float(out["active_macs/ratio"])
    if metric == "params":
        return float(out["active_params/ratio"])
    return float(out["structured_bops/total"] / out["structured_bops/baseline"])
