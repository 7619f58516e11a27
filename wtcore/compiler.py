"""Compile calculation specs over a `Structure` into a `Program`.

Passes (see DESIGN.md, "The compiler"):
1. resolve the requested specs and their declared dependencies as a DAG (networkx, topological order);
2. emit equations through a hash-consing builder (common subexpressions are shared across specs);
3. lower every per-unit reduction (`unit_reduce`) into dense per-parameter reductions whose small
   per-slice vectors are concatenated and scattered with ONE out-of-place `index_add`;
4. fold constants (everything that depends only on the IR) and drop dead equations;
5. generate a Python function from the equations (optionally wrapped in `torch.compile`);
6. cache the result by (structure fingerprint, specs, filters, backend).
"""

from __future__ import annotations

import fnmatch
import gc
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch

from .errors import SpecError, StructureError
from .ir import Slice, Structure
from .lang import PRIMITIVES, Builder, Eqn, Var, runtime_namespace
from .nonzero import col_any, row_any
from .program import Program
from .spec import REGISTRY, Spec, as_spec

__all__ = ["Context", "clear_cache", "compile", "select_slices"]

RUNTIME_KINDS = ("sumsq", "abssum", "nnz", "active")
CONST_KINDS = ("count",)


# ----------------------------------------------------------------------------- filters
def _matches(patterns: Sequence[str], param: str, module: str) -> bool:
    for pat in patterns:
        for name in (param, module):
            if fnmatch.fnmatchcase(name, pat) or (name and (name.startswith(pat + ".") or name == pat)):
                return True
    return False


def select_slices(
    structure: Structure, include: Iterable[str] | None = None, ignore: Iterable[str] | None = None
) -> dict[str, tuple[Slice, ...]]:
    """The slices kept by the filters, per group. Patterns are parameter or module names, or fnmatch globs;
    a module name also selects everything below it."""
    inc = list(include) if include is not None else None
    ign = list(ignore or ())
    if inc is not None and not any(_matches(inc, p.name, p.module) for p in structure.params):
        raise SpecError(f"include={inc!r} matches no parameter or module of the structure")
    out: dict[str, tuple[Slice, ...]] = {}
    for g in structure.groups:
        kept = []
        for s in g.slices:
            p = structure.param_map[s.param]
            if inc is not None and not _matches(inc, p.name, p.module):
                continue
            if ign and _matches(ign, p.name, p.module):
                continue
            kept.append(s)
        out[g.name] = tuple(kept)
    return out


# ----------------------------------------------------------------------------- spec context
@dataclass
class Context:
    """What a spec sees while emitting: the builder, the structure, its filtered slices, and dependencies."""

    b: Builder
    structure: Structure
    slices: dict[str, tuple[Slice, ...]]
    _memo: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = field(default_factory=dict)
    include: tuple[str, ...] | None = None  # the compile filters, for specs that select ops or parameters
    ignore: tuple[str, ...] = ()

    def selects(self, *names: str) -> bool:
        """Whether the compile filters keep something named `names` (a parameter and/or module name)."""
        if self.include is not None and not any(_matches(self.include, n, "") for n in names):
            return False
        return not (self.ignore and any(_matches(self.ignore, n, "") for n in names))

    def dep(self, name: str, **options: Any) -> Any:
        """Output of another spec (emitted once per distinct options, thanks to memoization and hash-consing)."""
        spec = Spec(name, **options)
        d, opts = spec.resolved()
        key = (d.name, tuple(sorted(opts.items())))
        if key not in self._memo:
            self._memo[key] = d.fn(self, **opts)
        return self._memo[key]

    # constants every spec may want (built once per compile via the builder's const cache)
    def params_per_unit(self) -> Var:
        """Number of distinct parameter elements in each unit (after filters), float64 constant."""
        return self.b.unit_reduce("count")

    def unit_group_ids(self) -> Var:
        return self._cached_const("unit_group_ids", lambda: torch.repeat_interleave(
            torch.arange(len(self.structure.groups)), torch.tensor([g.size for g in self.structure.groups])
        ))

    def group_ends(self) -> Var:
        return self._cached_const(
            "group_ends", lambda: torch.cumsum(torch.tensor([g.size for g in self.structure.groups]), 0)
        )

    def prunable_units(self) -> Var:
        return self._cached_const("prunable_units", lambda: torch.cat(
            [torch.full((g.size,), g.prunable, dtype=torch.bool) for g in self.structure.groups]
        ))

    def _cached_const(self, label: str, make: Any) -> Var:
        key = ("__const__", label)
        if key not in self._memo:
            self._memo[key] = self.b.const(make(), label)
        return self._memo[key]


# ----------------------------------------------------------------------------- lowering of unit_reduce
@dataclass
class _ParamPlan:
    name: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]  # axes kept by the dense reduction (R's dims, ascending)
    slices: list[tuple[Slice, int]]  # (slice, group offset)
    corrections: list[tuple[torch.Tensor, torch.Tensor]]  # (flat positions in R, global unit ids) to subtract


def _unit_map(s: Slice, axes: tuple[int, ...], shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """Global unit id (or -1) of every cell of R (the param reduced to `axes`), as an int64 tensor."""
    idx = s.index_tensor()
    glob = torch.where(idx >= 0, idx + offset, idx)
    if len(axes) == 1:
        return glob
    r_shape = tuple(shape[a] for a in axes)
    if s.groups == 1:
        d = axes.index(s.axis)
        view = [1, 1]
        view[d] = -1
        return glob.view(view).expand(r_shape)
    n_g = shape[s.group_axis] // s.groups
    length = shape[s.axis]
    g_of = torch.arange(shape[s.group_axis]) // n_g  # group of each position along group_axis
    table = glob.view(s.groups, length)[g_of]  # [group_axis_len, axis_len]
    return table if axes.index(s.group_axis) == 0 else table.t()


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
        # de-duplicate elements that two slices of this parameter map to the same unit; only slices of the
        # same group can do that (unit ids of different groups are disjoint)
        shared = [g for g in {g for _, _, g in items} if sum(1 for _, _, g2 in items if g2 == g) > 1]
        kept: list[tuple[Slice, int]] = []
        earlier: dict[str, list[tuple[Slice, int]]] = {g: [] for g in shared}
        for s, off, gname in items:
            if gname not in earlier:
                kept.append((s, off))
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
                kept.append((s, off))
                earlier[gname].append((s, off))
        plan.slices = kept
        plans.append(plan)
    return plans


def _overlap(
    a: Slice, a_off: int, b: Slice, b_off: int, plan: _ParamPlan
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Cells of R (the parameter reduced to `plan.axes`) that slices `a` and `b` map to the same unit:
    (flat positions, global unit ids, whether they are all of `b`'s cells), or None if there are none."""
    if a.groups == 1 and b.groups == 1 and len(plan.axes) == 2 and a.axis != b.axis:
        # rows of one axis and columns of the other: pair positions with equal units (no [O, I] maps)
        ia, ib = _runs_array(a, 0, -1), _runs_array(b, 0, -1)
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
        return torch.from_numpy(flat).long(), torch.from_numpy(ib[j] + b_off).long(), covers_all
    ua = _unit_map(a, plan.axes, plan.shape, a_off)
    ub = _unit_map(b, plan.axes, plan.shape, b_off)
    same = (ub == ua) & (ub >= 0)
    if not same.any():
        return None
    pos = same.flatten().nonzero().squeeze(1)
    return pos, ub.flatten()[pos], bool((same | (ub < 0)).all())


def _kind_value(b: Builder, kind: str, options: tuple[Any, ...], p: Var, shape: tuple[int, ...]) -> Var:
    if kind == "sumsq":
        return b.square(b.emit("acc", p))
    if kind == "abssum":
        return b.abs(b.emit("acc", p))
    if kind in ("nnz", "active"):  # a count of nonzeros is also > 0 exactly when something is active
        tol = float(options[0]) if options else 0.0
        hit = b.emit("ne", p, 0) if tol == 0.0 else b.gt(b.abs(p), tol)
        return b.cast_like(hit, b.emit("acc", p))
    raise SpecError(f"unknown unit_reduce kind {kind!r}; known: {RUNTIME_KINDS + CONST_KINDS}")


def _count_vector(plan: _ParamPlan) -> np.ndarray:
    """Elements per entry of each slice vector (and per overlap cell), in the order the runtime kinds emit
    them (overlap cells subtracted): arithmetic on the shape, never a parameter-sized tensor."""
    numel = 1
    for d in plan.shape:
        numel *= d
    parts = [
        np.full(plan.shape[s.axis] * s.groups, numel / (plan.shape[s.axis] * s.groups), dtype=np.float64)
        for s, _ in plan.slices
    ]
    if plan.corrections:
        cell = numel / (plan.shape[plan.axes[0]] * plan.shape[plan.axes[1]])
        parts += [np.full(pos.numel(), -cell, dtype=np.float64) for pos, _ in plan.corrections]
    return np.concatenate(parts)


def _leading_pair_vectors(b: Builder, v: Var, plan: _ParamPlan, out: list[Var]) -> None:
    """Slice vectors of a parameter sliced on axes 0 and 1 (conv and linear weights), straight from the
    elementwise value `v` of shape `[O, I, *K]`, using only reductions torch does fast: over a contiguous
    trailing block, or over leading dims. (Reducing the short kernel dims first, `sum((2, 3))`, is ~15x
    slower than a full pass on CPU.)"""
    o, i = plan.shape[0], plan.shape[1]
    k = 1
    for d in plan.shape[2:]:
        k *= d
    flat = b.emit("reshape", v, (o, i * k)) if len(plan.shape) != 2 else v

    def per_input(x: Var, lead: tuple[int, ...]) -> Var:  # [..., I*K] -> [..., I]
        return x if k == 1 else b.sum(b.emit("reshape", x, (*lead, i, k)), (len(lead) + 1,))

    for s, _ in plan.slices:
        if s.axis == 0 and s.groups == 1:
            out.append(b.sum(flat, (1,)))
        elif s.axis == 1 and s.groups == 1:
            out.append(per_input(b.sum(flat, (0,)), ()))
        elif s.axis == 1 and s.group_axis == 0:
            n_g = o // s.groups
            blocks = b.sum(b.emit("reshape", flat, (s.groups, n_g, i * k)), (1,))  # [G, I*K]
            out.append(b.emit("reshape", per_input(blocks, (s.groups,)), (-1,)))
        else:  # axis 0 grouped along axis 1: not produced by the front end, but keep it exact
            r = b.sum(b.emit("reshape", flat, (o, i, k)), (2,)) if k > 1 else flat
            n_g = i // s.groups
            blocks = b.sum(b.emit("reshape", b.emit("transpose", r, 0, 1), (s.groups, n_g, o)), (1,))
            out.append(b.emit("reshape", blocks, (-1,)))
    for flat_pos, _ in plan.corrections:
        cells = b.take(b.emit("reshape", v, (o * i, k)), b.const(flat_pos, "overlap_positions"))  # [n, K]
        out.append(b.emit("neg", b.sum(cells, (1,))))


def _plain_pair(plan: _ParamPlan) -> bool:
    """A weight with one ungrouped slice on axis 0 and one on axis 1, no overlap (most conv/linear weights)."""
    return (
        plan.axes == (0, 1)
        and not plan.corrections
        and sorted((s.axis, s.groups) for s, _ in plan.slices) == [(0, 1), (1, 1)]
    )


def _packed_active(plan: _ParamPlan) -> bool:
    """A weight whose activity comes from its `nonzero_stats` (`wtcore.nonzero`): 2+ dims, ungrouped slices
    on axes 0 and/or 1 (every conv/linear weight but grouped convs)."""
    return len(plan.shape) >= 2 and set(plan.axes) <= {0, 1} and all(s.groups == 1 for s, _ in plan.slices)


def _active_vectors(b: Builder, p: Var, plan: _ParamPlan, tolerance: float, out: list[Var]) -> None:
    """The `active` kind of a weight: per slice entry, 1 if its row/column has an element with |w| >
    tolerance (from the `nonzero_stats` shared with the zero counts and N:M blocks, `wtcore.nonzero`).
    Summed per unit by the scatter, the result is > 0 exactly for active units; overlap cells need no
    correction (counting a nonzero twice does not change > 0), so their entries are 0."""
    for s, _ in plan.slices:
        anys = row_any if s.axis == 0 else col_any
        out.append(b.emit("acc_like", anys(b, p, plan.shape, tolerance), p))
    for pos, _ in plan.corrections:
        out.append(b.emit("acc_like", b.const(torch.zeros(pos.numel(), dtype=torch.uint8), "no_correction"), p))


def _runs_array(s: Slice, offset: int, dump: int) -> np.ndarray:
    """Global unit id of every entry of a slice (`dump` for entries of no unit), straight from its runs."""
    parts = []
    for r in s.index:
        if r.start < 0:
            parts.append(np.full(r.length, dump, dtype=np.int64))
        elif r.repeat == 1 and r.step > 0:
            parts.append(np.arange(r.start + offset, r.start + offset + r.length * r.step, r.step, dtype=np.int64))
        else:
            parts.append(r.start + offset + (np.arange(r.length, dtype=np.int64) // r.repeat) * r.step)
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _scatter_order(plans: list[_ParamPlan]) -> tuple[list[_ParamPlan], set[str]]:
    """Plans in the order their vectors are concatenated: 1-D parameters with a single slice first (they are
    concatenated into one elementwise op when there are several), then the plain pairs (their sums of
    squares are one `sumsq_pairs` equation), then the others; and the names of the concatenated 1-D ones."""
    flat = [pl for pl in plans if len(pl.shape) == 1 and len(pl.slices) == 1 and not pl.corrections]
    names = {pl.name for pl in flat} if len(flat) >= 2 else set()
    rest = [pl for pl in plans if pl.name not in names]
    return [pl for pl in plans if pl.name in names] + [pl for pl in rest if _plain_pair(pl)] + \
        [pl for pl in rest if not _plain_pair(pl)], names


def _unit_index(order: list[_ParamPlan], num_units: int) -> np.ndarray:
    """The scatter's row of every vector entry, in `order`; -1 entries go to the dump row `num_units`.
    Built once per compile with numpy from the runs (shared by the runtime scatter and the constant counts)."""
    parts: list[np.ndarray] = []
    for pl in order:
        parts.extend(_runs_array(s, off, num_units) for s, off in pl.slices)
        parts.extend(units.numpy() for _, units in pl.corrections)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _emit_scatter(
    b: Builder, order: list[_ParamPlan], flat_names: set[str], kinds: list[tuple[str, tuple[Any, ...]]],
    num_units: int, index: np.ndarray
) -> dict[tuple[str, tuple[Any, ...]], Var]:
    """Emit the dense reductions for the runtime `kinds` and ONE index_add; return a [num_units] vector per kind."""
    vectors: dict[tuple[str, tuple[Any, ...]], list[Var]] = {k: [] for k in kinds}

    def slice_vectors(r: Var, plan: _ParamPlan, out: list[Var]) -> None:
        for s, _ in plan.slices:
            if len(plan.axes) == 1:
                out.append(r)
                continue
            pos = plan.axes.index(s.axis)
            if s.groups == 1:
                out.append(b.sum(r, (1 - pos,)))
                continue
            rt = r if pos == 1 else b.emit("transpose", r, 0, 1)  # [group_axis_len, axis_len]
            n_g = plan.shape[s.group_axis] // s.groups
            length = plan.shape[s.axis]
            blocks = b.emit("reshape", rt, (s.groups, n_g, length))
            out.append(b.emit("reshape", b.sum(blocks, (1,)), (-1,)))
        for flat_pos, _ in plan.corrections:
            out.append(b.emit("neg", b.take(b.emit("reshape", r, (-1,)), b.const(flat_pos, "overlap_positions"))))

    if index.size == 0:
        zeros = b.const(torch.zeros(num_units, dtype=torch.float32), "zeros")
        return {k: zeros for k in kinds}
    # 1-D parameters with a single slice are concatenated first: one elementwise op for all of them.
    if flat_names:
        flat = order[: len(flat_names)]
        cat = b.emit("cat", *[b.param(pl.name) for pl in flat])
        total = sum(pl.shape[0] for pl in flat)
        for k in kinds:
            vectors[k].append(_kind_value(b, k[0], k[1], cat, (total,)))
    pairs = [pl for pl in order[len(flat_names):] if _plain_pair(pl)]  # contiguous (`_scatter_order`)
    if pairs and any(k[0] == "sumsq" for k in kinds):
        layouts = tuple((pl.shape[0], pl.shape[1], math.prod(pl.shape[2:]), pl.slices[0][0].axis == 0) for pl in pairs)
        summed = b.emit("sumsq_pairs", *[b.param(pl.name) for pl in pairs], layouts)
        for k in kinds:
            if k[0] == "sumsq":
                vectors[k].append(summed)
    for pl in order[len(flat_names):]:
        p = b.param(pl.name)
        for k in kinds:
            parts: list[Var] = []
            if k[0] == "active" and _packed_active(pl):
                _active_vectors(b, p, pl, float(k[1][0]) if k[1] else 0.0, parts)
                vectors[k].append(b.emit("cat", *parts) if len(parts) > 1 else parts[0])
                continue
            if k[0] == "sumsq" and _plain_pair(pl):  # in the `sumsq_pairs` equation above
                continue
            v = _kind_value(b, k[0], k[1], p, pl.shape)
            if pl.axes == (0, 1):
                _leading_pair_vectors(b, v, pl, parts)
            else:
                # reduce every axis the slices do not use; size-1 axes are dropped by a free reshape, not a sum
                dims = tuple(d for d in range(len(pl.shape)) if d not in pl.axes and pl.shape[d] > 1)
                kept_shape = tuple(pl.shape[a] for a in pl.axes)
                r = b.sum(v, dims) if dims else v
                if len(pl.shape) - len(dims) != len(kept_shape):
                    r = b.emit("reshape", r, kept_shape)
                slice_vectors(r, pl, parts)
            # One small vector per parameter, made after its elementwise temporary is freed: a large
            # temporary then leaves a hole the next one fits in, instead of a hole that many small
            # live vectors were carved from (which makes glibc map fresh, page-faulting memory per call).
            vectors[k].append(b.emit("cat", *parts) if len(parts) > 1 else parts[0])

    idx = b.const(torch.from_numpy(index), "unit_index")
    cols = [b.emit("cat", *vectors[k]) if len(vectors[k]) > 1 else vectors[k][0] for k in kinds]
    out: dict[tuple[str, tuple[Any, ...]], Var] = {}
    if len(cols) == 1:
        out[kinds[0]] = b.emit("head", b.emit("scatter_add", idx, cols[0], num_units + 1), num_units)
    else:
        acc = b.emit("head", b.emit("scatter_add", idx, b.emit("stack", *cols), num_units + 1), num_units)
        for i, k in enumerate(kinds):
            out[k] = b.emit("column", acc, i)
    return out


def _unit_counts(order: list[_ParamPlan], index: np.ndarray, num_units: int) -> torch.Tensor:
    """Distinct parameter elements per unit (float64), at compile time: the same scatter as the runtime
    kinds, of the constant per-entry element counts (overlap cells subtracted)."""
    if index.size == 0:
        return torch.zeros(num_units, dtype=torch.float64)
    weights = np.concatenate([_count_vector(pl) for pl in order])
    return torch.from_numpy(np.bincount(index, weights=weights, minlength=num_units + 1)[:num_units])


def _lower_unit_reduce(b: Builder, structure: Structure, slices: Mapping[str, tuple[Slice, ...]]) -> dict[Var, Var]:
    """Replace every `unit_reduce` placeholder by its lowering; return the substitution applied."""
    lazy = [e for e in b.eqns if e.prim == "unit_reduce"]
    if not lazy:
        return {}
    plans = _plan(structure, slices)
    order, flat_names = _scatter_order(plans)
    index = _unit_index(order, structure.num_units)
    requested = list(dict.fromkeys((e.args[0], tuple(e.args[1:])) for e in lazy))
    for k in requested:
        if k[0] not in RUNTIME_KINDS + CONST_KINDS:
            raise SpecError(f"unknown unit_reduce kind {k[0]!r}; known: {RUNTIME_KINDS + CONST_KINDS}")
    runtime = [k for k in requested if k[0] in RUNTIME_KINDS]
    results: dict[tuple[str, tuple[Any, ...]], Var] = {}
    if runtime:
        results.update(_emit_scatter(b, order, flat_names, runtime, structure.num_units, index))
    for k in requested:
        if k[0] == "count":  # a constant: computed here, not emitted and folded
            results[k] = b.const(_unit_counts(order, index, structure.num_units), "params_per_unit")
    replace = {e.out: results[(e.args[0], tuple(e.args[1:]))] for e in lazy}
    _substitute(b, replace)
    return replace


def _substitute(b: Builder, replace: Mapping[Var, Var]) -> None:
    """Drop the equations defining `replace`'s keys and rewrite their uses. The lowered equations were
    appended at the end, so the list is no longer in topological order: `_schedule` restores one next."""

    def sub(a: Any) -> Any:
        if isinstance(a, Var):
            return replace.get(a, a)
        if isinstance(a, tuple):
            return tuple(sub(x) for x in a)
        return a

    b.eqns = [Eqn(e.out, e.prim, sub(e.args)) if any(v in replace for v in e.vars) else e
              for e in b.eqns if e.out not in replace]


# ----------------------------------------------------------------------------- folding, DCE, codegen
def _src(a: Any, loads: Mapping[Var, str]) -> str:
    """Source of an equation argument: a parameter or constant is read in place (`P[i]`, `C[k]`)."""
    if isinstance(a, Var):
        return loads.get(a) or repr(a)
    if isinstance(a, tuple):
        return "(" + ", ".join(_src(x, loads) for x in a) + ("," if len(a) == 1 else "") + ")"
    return repr(a)


def _fold_constants(b: Builder) -> None:
    ns = runtime_namespace()
    env: dict[Var, torch.Tensor] = dict(b.consts)
    new_eqns = []
    for e in b.eqns:
        vs = e.vars
        if e.prim not in ("param", "const") and vs and all(v in env for v in vs):
            local = {repr(v): env[v] for v in vs}
            with torch.no_grad():
                val = eval(PRIMITIVES[e.prim].template(*[repr(a) for a in e.args]), ns, local)
            env[e.out] = val
            b.consts[e.out] = val
            b.const_labels[e.out] = f"folded {e.prim}"
            new_eqns.append(Eqn(e.out, "const", (f"folded {e.prim}",)))
        else:
            new_eqns.append(e)
    b.eqns = new_eqns


def _dce(b: Builder, outputs: Iterable[Var]) -> None:
    live = set(outputs)
    keep = []
    for e in reversed(b.eqns):
        if e.out in live:
            keep.append(e)
            live.update(e.vars)
    b.eqns = keep[::-1]
    b.consts = {v: t for v, t in b.consts.items() if v in live}


def _schedule(b: Builder) -> None:
    """Order the equations parameter by parameter: a topological sort that always runs the ready equation
    whose inputs come from the earliest parameter. Specs emit per spec (all parameters for N:M, then all for
    sparsity, ...) and the unit reduction is lowered last, so emission order keeps every parameter's large
    intermediates alive to the end of the program; in this order each is produced, reduced and freed (by
    codegen's `del`) before the next parameter is read, and stays in cache while it is reused. It is also the
    one reordering pass: the lowered unit reduction is appended at the end, and this sort puts it in place."""
    import heapq

    eqns = b.eqns
    first_param: dict[str, int] = {}
    for e in eqns:
        if e.prim == "param":
            first_param.setdefault(e.args[0], len(first_param))
    users: dict[Var, list[int]] = {}
    deps_of: list[list[Var]] = []
    pending: list[int] = []
    for i, e in enumerate(eqns):
        deps = list(dict.fromkeys(e.vars))
        deps_of.append(deps)
        for v in deps:
            users.setdefault(v, []).append(i)
        pending.append(len(deps))
    rank: dict[Var, int] = {}

    def ranked(i: int) -> tuple[int, int]:
        e = eqns[i]
        r = first_param[e.args[0]] if e.prim == "param" else max((rank[v] for v in deps_of[i]), default=-1)
        rank[e.out] = r
        return r, i

    ready = [ranked(i) for i in range(len(eqns)) if pending[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in users.get(eqns[i].out, ()):
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, ranked(j))
    b.eqns = [eqns[i] for i in order]


def _batch_stats(b: Builder) -> None:
    """Turn the per-weight `nonzero_stats` equations of a program into ONE `nonzero_stats_batch` per
    (tolerance, m, keep) and per-weight views of it (`stats_part`): one native call reads every weight, its
    threads balance rows across weights, and a compiled program's wrapper makes one call, not one per weight.
    The batch needs every weight it reads, so parameter loads move to the front (they are read in place:
    their order only names the program's parameter list)."""
    batches: dict[tuple[Any, ...], list[Eqn]] = {}
    for e in b.eqns:
        if e.prim == "nonzero_stats":
            batches.setdefault(e.args[1:4], []).append(e)
    if not batches:
        return
    head = [e for e in b.eqns if e.prim == "param"]
    part: dict[Var, Eqn] = {}
    for key, eqns in batches.items():
        batch = b._new()
        head.append(Eqn(batch, "nonzero_stats_batch", (tuple(e.args[0] for e in eqns), *key)))
        row = col = 0
        for e in eqns:
            o, c = e.args[4], e.args[5]
            part[e.out] = Eqn(e.out, "stats_part", (batch, row, o, col, c))
            row, col = row + o, col + c
    b.eqns = head + [part.get(e.out, e) for e in b.eqns if e.prim != "param"]


#: Built-in primitives: each template yields a primary expression (a call, attribute, subscript or parenthesized
#: operation), so its source can stand unparenthesized inside another template. Primitives registered later are
#: never inlined.
_INLINABLE = frozenset(PRIMITIVES)


def _codegen(b: Builder, outputs: list[tuple[str, Var]]) -> tuple[str, list[str], list[torch.Tensor]]:
    param_names = list(dict.fromkeys(e.args[0] for e in b.eqns if e.prim == "param"))
    param_pos = {n: i for i, n in enumerate(param_names)}
    const_vars = [e.out for e in b.eqns if e.prim == "const"]
    const_pos = {v: i for i, v in enumerate(const_vars)}
    # parameters and constants are read in place, not bound to locals: a third fewer statements to compile
    # (the lists hold them anyway, so there is nothing to free)
    src: dict[Var, str] = {}  # Var -> the expression that stands for it (no local variable)
    params: dict[Var, str] = {}  # parameter loads -> "P[i]"
    for e in b.eqns:
        if e.prim == "param":
            src[e.out] = params[e.out] = f"P[{param_pos[e.args[0]]}]"
        elif e.prim == "const":
            src[e.out] = f"C[{const_pos[e.out]}]"
    body = [e for e in b.eqns if e.out not in src]
    keep = {v for _, v in outputs}
    # A value used once, by the very next statement, is written inside it (`x.square().sum(1)` rather than
    # three assignments and two `del`s): the same evaluation order and lifetimes (a temporary of an expression
    # is freed as soon as its consumer returns), and half the source for Python to compile.
    uses: dict[Var, int] = {}
    next_user: dict[Var, int] = {}
    for i, e in enumerate(body):
        for a in e.vars:
            uses[a] = uses.get(a, 0) + 1
            next_user[a] = i
    inline = [uses.get(e.out) == 1 and next_user[e.out] == i + 1 and e.out not in keep and e.prim in _INLINABLE
              for i, e in enumerate(body)]
    # where each statement's value is computed: an inlined one inside its consumer (chains resolve forward)
    at = list(range(len(body)))
    for i in range(len(body) - 2, -1, -1):
        if inline[i]:
            at[i] = at[i + 1]
    last_use: dict[Var, int] = {}
    for i, e in enumerate(body):
        for a in e.vars:
            last_use[a] = at[i]
    lines = ["def wt_program(P, C):"]
    named: set[Var] = set()
    leaves: dict[Var, list[Var]] = {}  # inlined Var -> the loads and locals its expression reads
    template = {name: prim.template for name, prim in PRIMITIVES.items()}
    for i, e in enumerate(body):
        expr = template[e.prim](*[_src(a, src) for a in e.args])
        read: list[Var] = []
        for a in e.vars:
            inner = leaves.get(a)
            if inner is None:
                read.append(a)
            else:
                read.extend(inner)
        if inline[i]:
            src[e.out], leaves[e.out] = expr, read
            continue
        line = f"    {e.out!r} = {expr}"
        first = [v for v in dict.fromkeys(read) if v in params and v not in named]
        if first:  # name each parameter where it is first read
            named.update(first)
            line += "  # " + ", ".join(f"{params[v]}: {param_names[int(params[v][2:-1])]}" for v in first)
        lines.append(line)
        # free every intermediate right after its last use: large squared buffers are then reused by the
        # allocator instead of being freshly mapped (and page-faulted) on every call
        dead = [v for v in dict.fromkeys(read) if v not in src and last_use[v] == i and v not in keep]
        if dead:
            lines.append("    del " + ", ".join(repr(v) for v in sorted(dead, key=lambda v: v.id)))
    lines.append("    return (" + "".join(f"{_src(v, src)}, " for _, v in outputs) + ")")
    return "\n".join(lines) + "\n", param_names, [b.consts[v] for v in const_vars]


# ----------------------------------------------------------------------------- entry point
#: Compiled programs by (structure fingerprint, specs, filters, backend); least recently used first out, so
#: a long run that re-traces after every pruning step does not keep every old program's constants alive.
_CACHE: OrderedDict[tuple[Any, ...], Program] = OrderedDict()
CACHE_SIZE = 64


def clear_cache() -> None:
    _CACHE.clear()


def _spec_dag(requests: Sequence[Spec]) -> list[str]:
    graph = nx.DiGraph()
    todo = [r.name for r in requests]
    while todo:
        name = todo.pop()
        if name in graph and graph.nodes[name].get("seen"):
            continue
        d = REGISTRY.get(name)
        if d is None:
            raise SpecError(f"unknown spec {name!r}; known specs: {', '.join(sorted(REGISTRY))}")
        graph.add_node(name, seen=True)
        for dep in d.deps:
            graph.add_edge(dep, name)
            todo.append(dep)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise SpecError(f"spec dependencies form a cycle: {cycle}")
    return list(nx.lexicographical_topological_sort(graph))


def compile(
    structure: Structure,
    specs: Sequence[str | Spec] | str | Spec,
    include: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    backend: str | None = None,
) -> Program:
    """Compile `specs` over `structure` into a pure function of the parameter dict.

    `include`/`ignore` select slices by parameter or module name (fnmatch globs; a module selects its
    submodules). `backend="inductor"` (or any `torch.compile` backend) wraps the generated function in
    `torch.compile(fullgraph=True)`.
    """
    if isinstance(specs, (str, Spec)):
        specs = [specs]
    requests = [as_spec(s) for s in specs]
    if not requests:
        raise SpecError("compile() needs at least one spec")
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise SpecError(f"two requested specs share an output key: {keys}; pass key= to tell them apart")
    resolved = [r.resolved() for r in requests]  # validates names and options
    inc = tuple(include) if include is not None else None
    ign = tuple(ignore or ())
    cache_key = (
        structure.fingerprint,
        tuple((r.name, r.options, r.key, id(REGISTRY[r.name].fn)) for r in requests),
        inc,
        ign,
        backend,
    )
    hit = _CACHE.get(cache_key)
    if hit is not None:
        _CACHE.move_to_end(cache_key)
        return hit

    # the passes below allocate many small objects and free none in cycles: a full collection triggered
    # half-way walks the whole heap (a model's worth of objects) for nothing, ~10 ms on ViT-B/16
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        program = _compile(structure, requests, resolved, inc, ign, backend)
    finally:
        if gc_was_enabled:
            gc.enable()
    _CACHE[cache_key] = program
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return program


def _compile(structure: Structure, requests: list[Spec], resolved: list[Any], inc: tuple[str, ...] | None,
             ign: tuple[str, ...], backend: str | None) -> Program:
    order = _spec_dag(requests)
    slices = select_slices(structure, inc, ign)
    b = Builder()
    ctx = Context(b, structure, slices, include=inc, ignore=ign)
    rank = {n: i for i, n in enumerate(order)}
    outs_by_req: dict[str, Any] = {}
    for r, (d, opts) in sorted(zip(requests, resolved), key=lambda x: rank[x[0].name]):
        outs_by_req[r.key] = ctx.dep(d.name, **opts)
    outputs: list[tuple[str, Var]] = []
    for r in requests:
        val = outs_by_req[r.key]
        if isinstance(val, Var):
            outputs.append((r.key, val))
        elif isinstance(val, Mapping):
            outputs.extend((f"{r.key}/{k}", v) for k, v in val.items())
        else:
            raise SpecError(f"spec {r.name!r} returned {type(val).__name__}; a spec returns a Var or a dict of Vars")

    replace = _lower_unit_reduce(b, structure, slices)
    outputs = [(k, replace.get(v, v)) for k, v in outputs]
    _schedule(b)
    _fold_constants(b)
    _dce(b, [v for _, v in outputs])
    _batch_stats(b)
    code, param_names, consts = _codegen(b, outputs)
    program = Program(
        structure=structure,
        code=code,
        param_names=param_names,
        consts=consts,
        output_keys=[k for k, _ in outputs],
        eqns=list(b.eqns),
        const_labels=[b.const_labels.get(e.out, "") for e in b.eqns if e.prim == "const"],
        backend=backend,
    )
    return program
