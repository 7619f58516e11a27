"""The static IR: canonical unit groups, the slices that tie parameters to units, and cost ops.

Everything here is a frozen dataclass of plain Python values, so a `Structure` can be printed,
hashed, compared, serialized to JSON and fingerprinted without touching a model or a tensor.
Index vectors are stored as *runs* and only materialized as tensors by the compiler.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import numpy as np
import torch

from .errors import StructureError

__all__ = [
    "AxisPart",
    "CostAxis",
    "CostOp",
    "Coverage",
    "Param",
    "Run",
    "Slice",
    "Structure",
    "UnitGroup",
    "coverage",
    "runs_from_list",
    "runs_length",
    "runs_to_array",
    "runs_to_list",
    "runs_to_tensor",
]


@dataclass(frozen=True)
class Run:
    """`length` consecutive index entries; entry `i` maps to unit `start + (i // repeat) * step`.

    `start == -1` with `step == 0` marks entries that belong to no unit of the group.
    One run covers an identity mapping (`step=1, repeat=1`), an offset (concat), a constant,
    and `repeat_interleave` patterns such as the `head_dim` rows of one attention head.
    """

    length: int
    start: int
    step: int = 1
    repeat: int = 1

    def values(self) -> list[int]:
        if self.start < 0:
            return [-1] * self.length
        return [self.start + (i // self.repeat) * self.step for i in range(self.length)]


def runs_length(runs: Iterable[Run]) -> int:
    return sum(r.length for r in runs)


def runs_to_list(runs: Iterable[Run]) -> list[int]:
    out: list[int] = []
    for r in runs:
        out.extend(r.values())
    return out


def runs_to_array(runs: Iterable[Run], offset: int = 0, none: int = -1) -> np.ndarray:
    """The unit of every entry of a run-encoded index, int64, plus `offset` (a group's place in the global unit
    vector); entries of no unit read `none`. The one materialization of an index: every table of units per
    entry (the compiler's scatter index, masks, cost axes, the trace's coverage check) is built from it."""
    parts = []
    for r in runs:
        if r.start < 0:
            parts.append(np.full(r.length, none, dtype=np.int64))
        elif r.repeat == 1 and r.step > 0:
            parts.append(np.arange(r.start + offset, r.start + offset + r.length * r.step, r.step, dtype=np.int64))
        else:
            parts.append(r.start + offset + (np.arange(r.length, dtype=np.int64) // r.repeat) * r.step)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def runs_to_tensor(runs: Iterable[Run], offset: int = 0, none: int = -1) -> torch.Tensor:
    """`runs_to_array` as an int64 tensor (compile time only)."""
    return torch.from_numpy(runs_to_array(runs, offset, none))


def runs_from_list(values: Sequence[int] | np.ndarray) -> tuple[Run, ...]:
    """Compress an index list into runs (the inverse of `runs_to_list`).

    The common shapes (identity, offset, constant, repeat_interleave) are recognized with numpy in one
    pass; irregular indices fall back to a loop over runs of equal values, not over entries.
    """
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size == 0:
        return ()
    first, n = int(v[0]), v.size
    if first >= 0 and int(v[-1]) == first + n - 1 and np.array_equal(v, np.arange(first, first + n)):
        return (Run(n, first, 1, 1),)  # the common case (identity or offset), without the general pass
    v = np.where(v < 0, -1, v)
    starts = np.flatnonzero(np.concatenate(([True], v[1:] != v[:-1])))
    counts = np.diff(np.append(starts, v.size))
    vals = v[starts]
    if vals.size == 1:
        return (Run(v.size, -1, 0, 1),) if vals[0] < 0 else (Run(v.size, int(vals[0]), 1, v.size),)
    steps = np.diff(vals)
    if (vals >= 0).all() and (counts == counts[0]).all() and (steps == steps[0]).all():
        return (Run(v.size, int(vals[0]), int(steps[0]), int(counts[0])),)
    vals_l, counts_l = vals.tolist(), counts.tolist()
    runs: list[Run] = []
    i, n = 0, len(vals_l)
    while i < n:
        c, start = counts_l[i], vals_l[i]
        if start < 0:
            runs.append(Run(c, -1, 0, 1))
            i += 1
            continue
        j, step = i + 1, 1
        if j < n and counts_l[j] == c and vals_l[j] >= 0:
            step = vals_l[j] - start
            j += 1
            while j < n and counts_l[j] == c and vals_l[j] >= 0 and vals_l[j] - vals_l[j - 1] == step:
                j += 1
        runs.append(Run(c * (j - i), start, step, c))
        i = j
    return tuple(runs)


@dataclass(frozen=True)
class Slice:
    """How one parameter takes part in one unit group.

    `index[i]` is the unit (within the group) of entry `i` along `axis`, or -1 for none.
    For a grouped convolution's channel axis (`groups > 1`) the index runs over the *full*
    channel count `groups * shape[axis]`: the element at position `j` of `axis` whose position
    along `group_axis` falls into group `g` belongs to channel `g * shape[axis] + j`.
    """

    param: str
    axis: int
    index: tuple[Run, ...]
    groups: int = 1
    group_axis: int = 0

    def index_list(self) -> list[int]:
        return runs_to_list(self.index)

    def index_tensor(self) -> torch.Tensor:
        return runs_to_tensor(self.index)

    def unit_ids(self, offset: int = 0, none: int = -1) -> np.ndarray:
        """The unit of every entry along `axis` (`runs_to_array`)."""
        return runs_to_array(self.index, offset, none)

    def unit_table(self, shape: Sequence[int], offset: int = 0, none: int = -1) -> np.ndarray:
        """The unit of every element of a parameter of `shape`, as an int64 array that broadcasts against it:
        size 1 on every dim but `axis` (and `group_axis` for a grouped slice, whose channel depends on both).
        Every per-element map of units (the compiler's reductions, masks, overlap checks) starts here."""
        ids = self.unit_ids(offset, none)
        view = [1] * len(shape)
        if self.groups == 1:
            view[self.axis] = shape[self.axis]
            return ids.reshape(view)
        per_group = shape[self.group_axis] // self.groups
        table = ids.reshape(self.groups, shape[self.axis])[np.arange(shape[self.group_axis]) // per_group]
        if self.group_axis > self.axis:  # table is [group_axis, axis]; lay it out in dim order
            table = table.T
        view[self.group_axis], view[self.axis] = shape[self.group_axis], shape[self.axis]
        return np.ascontiguousarray(table).reshape(view)

    def units(self) -> set[int]:
        return {u for u in self.index_list() if u >= 0}


@dataclass(frozen=True)
class UnitGroup:
    """A set of canonical units that are pruned together, with every parameter slice coupled to them."""

    name: str
    kind: str
    size: int
    slices: tuple[Slice, ...]
    prunable: bool = True
    root: str = ""
    baseline_size: int = -1
    reason: str = ""
    # why removing a unit is not the same function as zeroing it (a norm over the units), "" when it is: masks
    # leave such groups alone unless asked, as physical pruning refuses them unless strict=False
    lossy: str = ""

    def __post_init__(self) -> None:
        if self.baseline_size < 0:
            object.__setattr__(self, "baseline_size", self.size)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.param for s in self.slices))


@dataclass(frozen=True)
class Param:
    """A parameter by canonical name (the first name under which the tensor is reachable)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    module: str = ""
    module_type: str = ""
    aliases: tuple[str, ...] = ()
    # shape in the original (unpruned) model; () means `shape`. Not part of equality (a re-traced pruned model
    # equals the structure it was pruned to), but part of the JSON and so of the fingerprint.
    baseline_shape: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.baseline_shape:
            object.__setattr__(self, "baseline_shape", tuple(self.shape))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def baseline_numel(self) -> int:
        """Elements in the original (unpruned) model: the dense reference of `active_params`."""
        n = 1
        for d in self.baseline_shape:
            n *= d
        return n


@dataclass(frozen=True)
class AxisPart:
    """Positions of a cost axis that follow one unit group: `index[i]` is the unit of position `i` (or -1)."""

    group: str
    index: tuple[Run, ...]

    def index_list(self) -> list[int]:
        return runs_to_list(self.index)


@dataclass(frozen=True)
class CostAxis:
    """One axis of a costed op, `size` positions long.

    Coarse form: active size = (active units of `group`) * `scale`; static (always `size`) if no group.
    Exact form (`parts` non-empty, `group` ignored): position `i` is inactive when a part maps it to an
    inactive unit, so an axis fed by a concat of several groups (densenet), a flatten (`repeat`) or partly
    by no group (the RGB input of a stem conv) counts exactly the positions that physical pruning keeps.
    Parts cover disjoint positions.
    """

    name: str
    size: int
    group: str | None = None
    scale: int = 1
    parts: tuple[AxisPart, ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        """The unit groups this axis follows."""
        if self.parts:
            return tuple(dict.fromkeys(p.group for p in self.parts))
        return (self.group,) if self.group is not None else ()


@dataclass(frozen=True)
class CostOp:
    """A costed computation of the example forward pass (1 MAC = one multiply-add).

    `macs` are the dense MACs of the op as traced; active MACs = `macs` * prod(active / size) over `axes`.
    `baseline_macs` keeps the dense MACs of the original (unpruned) model after physical pruning, so
    compression stays relative to it (defaults to `macs`). `param` is the weight the op multiplies with
    (canonical name; "" for weightless ops such as attention matmuls).
    """

    name: str
    module: str
    kind: str
    macs: int
    axes: tuple[CostAxis, ...] = ()
    param: str = ""
    baseline_macs: int = -1

    def __post_init__(self) -> None:
        if self.baseline_macs < 0:
            object.__setattr__(self, "baseline_macs", self.macs)


@dataclass(frozen=True)
class Structure:
    """The model-level IR: parameters, unit groups and cost ops. Frozen, printable, JSON round-trip."""

    params: tuple[Param, ...]
    groups: tuple[UnitGroup, ...]
    ops: tuple[CostOp, ...] = ()
    model: str = ""
    uncoupled: tuple[str, ...] = field(default=())
    # (module or parameter, reason): left static because their channels cannot be mapped to units (a boundary)
    boundaries: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ lookups
    @cached_property
    def param_map(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    @cached_property
    def group_map(self) -> dict[str, UnitGroup]:
        return {g.name: g for g in self.groups}

    @cached_property
    def offsets(self) -> dict[str, int]:
        """Offset of each group in the global unit vector."""
        out, o = {}, 0
        for g in self.groups:
            out[g.name] = o
            o += g.size
        return out

    @property
    def num_units(self) -> int:
        return sum(g.size for g in self.groups)

    def group_index(self, name: str) -> int:
        for i, g in enumerate(self.groups):
            if g.name == name:
                return i
        raise StructureError(f"unknown unit group {name!r}; known groups: {[g.name for g in self.groups][:8]}...")

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        names: set[str] = set()
        for p in self.params:
            if p.name in names:
                raise StructureError(f"parameter {p.name!r} appears twice in the structure")
            names.add(p.name)
        seen_groups: set[str] = set()
        for g in self.groups:
            if g.name in seen_groups:
                raise StructureError(f"unit group {g.name!r} appears twice")
            seen_groups.add(g.name)
            if g.size <= 0:
                raise StructureError(f"unit group {g.name!r} has size {g.size}; groups must have at least one unit")
            keys = set()
            for s in g.slices:
                p = self.param_map.get(s.param) if names else None
                if p is None:
                    raise StructureError(f"group {g.name!r} has a slice of unknown parameter {s.param!r}")
                if not 0 <= s.axis < len(p.shape):
                    raise StructureError(f"group {g.name!r}: axis {s.axis} out of range for {s.param!r} {p.shape}")
                if (s.param, s.axis) in keys:
                    raise StructureError(f"group {g.name!r} has two slices of {s.param!r} on axis {s.axis}")
                keys.add((s.param, s.axis))
                if s.groups < 1 or not 0 <= s.group_axis < len(p.shape):
                    raise StructureError(
                        f"group {g.name!r}: slice of {s.param!r} has groups={s.groups}, group_axis={s.group_axis}; "
                        f"groups must be >= 1 and group_axis a non-negative axis of shape {p.shape}"
                    )
                want = p.shape[s.axis] * s.groups
                if runs_length(s.index) != want:
                    raise StructureError(
                        f"group {g.name!r}: slice of {s.param!r} axis {s.axis} has {runs_length(s.index)} entries, "
                        f"expected {want}"
                    )
                if s.groups > 1 and (s.group_axis == s.axis or p.shape[s.group_axis] % s.groups):
                    raise StructureError(f"group {g.name!r}: bad grouping of {s.param!r} ({s.groups} groups)")
                for r in s.index:
                    hi = r.start + ((r.length - 1) // r.repeat) * r.step if r.length else r.start
                    if r.start >= 0 and not (0 <= min(r.start, hi) and max(r.start, hi) < g.size):
                        raise StructureError(
                            f"group {g.name!r}: slice of {s.param!r} maps to units outside 0..{g.size - 1}"
                        )
        for op in self.ops:
            if op.param and op.param not in names:
                raise StructureError(f"cost op {op.name!r} refers to unknown parameter {op.param!r}")
            for a in op.axes:
                if a.group is not None and a.group not in seen_groups:
                    raise StructureError(f"cost op {op.name!r} axis {a.name!r} refers to unknown group {a.group!r}")
                for part in a.parts:
                    g = self.group_map.get(part.group)
                    if g is None:
                        raise StructureError(
                            f"cost op {op.name!r} axis {a.name!r} refers to unknown group {part.group!r}"
                        )
                    if runs_length(part.index) != a.size:
                        raise StructureError(
                            f"cost op {op.name!r} axis {a.name!r}: a part of group {part.group!r} has "
                            f"{runs_length(part.index)} entries, expected {a.size}"
                        )
                    if any(u >= g.size for u in part.index_list()):
                        raise StructureError(
                            f"cost op {op.name!r} axis {a.name!r} maps to units outside 0..{g.size - 1} of {g.name!r}"
                        )

    def with_baseline(self, original: Structure) -> Structure:
        """This structure (e.g. re-traced after physical pruning) with the dense reference of `original`:
        each group's `baseline_size` and each op's `baseline_macs` come from the group/op of the same name
        there, so compression and pruned-unit counts stay relative to the unpruned model."""
        sizes = {g.name: g.baseline_size for g in original.groups}
        macs = {o.name: o.baseline_macs for o in original.ops}
        shapes = {p.name: p.baseline_shape for p in original.params}
        groups = tuple(replace(g, baseline_size=max(sizes.get(g.name, g.baseline_size), g.size)) for g in self.groups)
        ops = tuple(replace(o, baseline_macs=macs.get(o.name, o.baseline_macs)) for o in self.ops)
        params = tuple(
            replace(p, baseline_shape=shapes[p.name]) if len(shapes.get(p.name, ())) == len(p.shape) else p
            for p in self.params
        )
        return replace(self, params=params, groups=groups, ops=ops)

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {
            "format": "wt.structure/1",
            "model": self.model,
            "params": [_param_to_dict(p) for p in self.params],
            "groups": [
                {
                    **{k: v for k, v in _shallow(g, skip="slices").items() if k != "lossy" or v},
                    "slices": [
                        {
                            "param": s.param,
                            "axis": s.axis,
                            "index": [[r.length, r.start, r.step, r.repeat] for r in s.index],
                            "groups": s.groups,
                            "group_axis": s.group_axis,
                        }
                        for s in g.slices
                    ],
                }
                for g in self.groups
            ],
            "ops": [_op_to_dict(o) for o in self.ops],
            "uncoupled": list(self.uncoupled),
            **({"boundaries": [list(b) for b in self.boundaries]} if self.boundaries else {}),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Structure:
        if d.get("format") != "wt.structure/1":
            raise StructureError(f"not a wt structure (format={d.get('format')!r})")
        params = tuple(
            Param(p["name"], tuple(p["shape"]), p["dtype"], p["module"], p["module_type"], tuple(p["aliases"]),
                  tuple(p.get("baseline_shape", ())))
            for p in d["params"]
        )
        groups = tuple(
            UnitGroup(
                name=g["name"],
                kind=g["kind"],
                size=g["size"],
                slices=tuple(
                    Slice(s["param"], s["axis"], tuple(Run(*r) for r in s["index"]), s["groups"], s["group_axis"])
                    for s in g["slices"]
                ),
                prunable=g["prunable"],
                root=g["root"],
                baseline_size=g["baseline_size"],
                reason=g["reason"],
                lossy=g.get("lossy", ""),
            )
            for g in d["groups"]
        )
        ops = tuple(_op_from_dict(o) for o in d["ops"])
        boundaries = tuple((str(m), str(r)) for m, r in d.get("boundaries", ()))
        return cls(params, groups, ops, d.get("model", ""), tuple(d.get("uncoupled", ())), boundaries)

    @classmethod
    def from_json(cls, s: str) -> Structure:
        return cls.from_dict(json.loads(s))

    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of the IR (independent of Python's hash seed); keys the compile cache."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    # ----------------------------------------------------------------- printing
    def __str__(self) -> str:
        return format_structure(self)


def _op_to_dict(o: CostOp) -> dict:
    """Fields added after the first release (parts, param, baseline_macs) are written only when set, so the
    JSON (and fingerprint) of a structure that does not use them is unchanged."""
    axes = []
    for a in o.axes:
        ad: dict = {"name": a.name, "size": a.size, "group": a.group, "scale": a.scale}
        if a.parts:
            ad["parts"] = [[p.group, [[r.length, r.start, r.step, r.repeat] for r in p.index]] for p in a.parts]
        axes.append(ad)
    d: dict = {"name": o.name, "module": o.module, "kind": o.kind, "macs": o.macs, "axes": axes}
    if o.param:
        d["param"] = o.param
    if o.baseline_macs != o.macs:
        d["baseline_macs"] = o.baseline_macs
    return d


def _op_from_dict(o: dict) -> CostOp:
    axes = tuple(
        CostAxis(
            a["name"], a["size"], a.get("group"), a.get("scale", 1),
            tuple(AxisPart(g, tuple(Run(*r) for r in runs)) for g, runs in a.get("parts", ())),
        )
        for a in o["axes"]
    )
    return CostOp(o["name"], o["module"], o["kind"], o["macs"], axes, o.get("param", ""), o.get("baseline_macs", -1))


def _param_to_dict(p: Param) -> dict:
    """A parameter's fields; `baseline_shape` (added after the first release) only when it differs from
    `shape`, so unpruned structures keep their JSON and fingerprint."""
    d = _shallow(p, skip="baseline_shape")
    if p.baseline_shape != p.shape:
        d["baseline_shape"] = list(p.baseline_shape)
    return d


def _shallow(obj: object, skip: str = "") -> dict:
    """The fields of a flat dataclass as a dict (`asdict` deep-copies nested slices only to drop them)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name != skip}


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(list(headers)), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _axes(o: CostOp) -> str:
    def groups(a: CostAxis) -> str:
        gs = a.groups
        if not gs:
            return ""
        return "[" + gs[0] + (f" +{len(gs) - 1} more" if len(gs) > 1 else "") + "]"

    return " x ".join(f"{a.name}={a.size}" + groups(a) for a in o.axes)


def _members(g: UnitGroup, limit: int = 3) -> str:
    mods = list(dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else p for p in g.params))
    head = ", ".join(mods[:limit])
    return head + (f", ... (+{len(mods) - limit})" if len(mods) > limit else "")


def format_structure(s: Structure, max_rows: int | None = None) -> str:
    n_params = sum(p.numel for p in s.params)
    lines = [
        f"Structure of {s.model or 'model'}: {len(s.groups)} unit groups, {s.num_units} units, "
        f"{len(s.params)} parameters ({n_params:,} elements), {len(s.ops)} cost ops  [fingerprint {s.fingerprint}]"
    ]
    rows = []
    for i, g in enumerate(s.groups):
        if max_rows is not None and i >= max_rows:
            rows.append(["...", f"({len(s.groups) - max_rows} more)", "", "", "", "", ""])
            break
        size = f"{g.size}" if g.size == g.baseline_size else f"{g.size}/{g.baseline_size}"
        rows.append(
            [i, g.name, g.kind, size, "yes" if g.prunable else "no", len(g.slices), _members(g)]
        )
    lines.append(_table(["#", "group", "kind", "units", "prunable", "slices", "members"], rows, right=(0, 3, 5)))
    if s.ops:
        total = sum(o.macs for o in s.ops) or 1
        orows = [
            [o.name, o.kind, f"{o.macs:,}", f"{100 * o.macs / total:.1f}%", _axes(o)]
            for o in s.ops
        ]
        lines.append("")
        lines.append(f"Cost ops (1 MAC = one multiply-add), total {total:,} MACs")
        lines.append(_table(["op", "kind", "MACs", "share", "axes"], orows, right=(2, 3)))
    lines.append("")
    lines.append(coverage(s).line())
    if s.uncoupled:
        lines.append(f"Parameters in no unit group ({len(s.uncoupled)}): " + ", ".join(s.uncoupled[:10]))
    return "\n".join(lines)


NO_GROUP_REASON = "Torch-Pruning couples none of its axes to a layer that roots a group"


@dataclass(frozen=True)
class Coverage:
    """How much of a model pruning can reach: elements, parameters and sliced axes in prunable groups, in
    groups that are not prunable only, and in no group, with why for the last two."""

    elements: tuple[int, int, int]  # in a prunable group, in groups not prunable only, in no group
    params: tuple[int, int, int]
    axes: tuple[int, int]  # (parameter, axis) pairs sliced by a prunable group, by groups not prunable only
    not_prunable: tuple[tuple[str, str], ...]  # (group, reason)
    outside: tuple[tuple[str, str], ...]  # (parameter in no group, reason)

    def line(self) -> str:
        total = sum(self.elements) or 1
        pe, ne, oe = self.elements
        pp, np_, op = self.params
        text = (f"Coverage: {100 * pe / total:.1f}% of elements in prunable groups ({pe:,} elements, {pp} params, "
                f"{self.axes[0]} axes), {ne:,} in groups not prunable ({np_} params, {self.axes[1]} axes), "
                f"{oe:,} in no group ({op} params)")
        by_reason: dict[str, list[str]] = {}
        for p, r in self.outside:
            by_reason.setdefault(r, []).append(p)
        if by_reason:
            text += "; outside every group: " + "; ".join(
                ", ".join(repr(p) for p in ps[:3]) + (f" (+{len(ps) - 3})" if len(ps) > 3 else "") + f": {r}"
                for r, ps in by_reason.items()
            )
        return text


def coverage(s: Structure) -> Coverage:
    """Coverage of `s`; a parameter in no group gets the reason of the boundary module holding it (the
    nearest enclosing one), else `NO_GROUP_REASON`."""
    prunable: dict[str, set[int]] = {}
    static: dict[str, set[int]] = {}
    for g in s.groups:
        for sl in g.slices:
            (prunable if g.prunable else static).setdefault(sl.param, set()).add(sl.axis)
    elements, params = [0, 0, 0], [0, 0, 0]
    for p in s.params:
        k = 0 if p.name in prunable else 1 if p.name in static else 2
        elements[k] += p.numel
        params[k] += 1
    axes = (sum(len(a) for a in prunable.values()),
            sum(len(a - prunable.get(n, set())) for n, a in static.items()))
    bounds = dict(s.boundaries)

    def reason(param: str) -> str:
        if param in bounds:
            return bounds[param]
        mod = s.param_map[param].module if param in s.param_map else param.rpartition(".")[0]
        while True:
            if mod in bounds:
                return bounds[mod]
            if not mod:
                return NO_GROUP_REASON
            mod = mod.rpartition(".")[0]

    outside = tuple((p.name, reason(p.name)) for p in s.params if p.name not in prunable and p.name not in static)
    return Coverage(tuple(elements), tuple(params), axes,
                    tuple((g.name, g.reason) for g in s.groups if not g.prunable), outside)
