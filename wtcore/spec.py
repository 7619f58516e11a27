"""Calculation specs: named, parametrized recipes that emit equations through a `Builder`.

A spec is a function `fn(ctx, **options) -> Var | dict[str, Var]` registered with `define_spec`, which
also declares what it returns (`outputs`). Built-in specs use exactly this API, so a user's spec is a
first-class citizen:

    @wtcore.define_spec("unit_rms", deps=("unit_sumsq",), outputs="unit")
    def unit_rms(ctx):
        b = ctx.b
        return b.safe_sqrt(b.div(ctx.dep("unit_sumsq"), b.maximum(ctx.params_per_unit(), 1.0)))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from .errors import SpecError
from .filters import matches
from .ir import Slice, Structure
from .lang import Builder, Var

__all__ = ["AXES", "REGISTRY", "Context", "Spec", "SpecDef", "as_spec", "define_spec", "spec_order"]

#: What an output is indexed by: one value ("scalar"), or one entry per unit, unit group, cost op,
#: selected parameter, histogram bin, or a parameter's elements ("elements": masks, keyed by parameter).
AXES = ("scalar", "unit", "group", "op", "param", "bin", "edge", "elements")

Outputs = str | Mapping[str, str]
OutputsDecl = Outputs | Callable[..., Outputs]


@dataclass(frozen=True)
class SpecDef:
    name: str
    fn: Callable[..., Var | Mapping[str, Var]]
    deps: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...]
    #: one axis name (the spec returns a Var), {output name: axis} (it returns a dict of Vars), or a function of
    #: the options giving either (when they change what the spec returns)
    outputs: OutputsDecl
    doc: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.defaults)

    def outputs_for(self, options: Mapping[str, Any]) -> Outputs:
        """What the spec returns with these options (defaults filled in)."""
        out = self.outputs(**{**dict(self.defaults), **options}) if callable(self.outputs) else self.outputs
        _check_outputs(self.name, out)
        return out


REGISTRY: dict[str, SpecDef] = {}


def _check_outputs(name: str, outputs: Outputs) -> None:
    axes = [outputs] if isinstance(outputs, str) else list(outputs.values())
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise SpecError(f"spec {name!r}: outputs use unknown axes {bad}; known: {AXES}")


def define_spec(
    name: str | None = None, *, deps: tuple[str, ...] = (), outputs: OutputsDecl = "unit", replace: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a spec. Keyword arguments of `fn` (after `ctx`) are its options, with their defaults.

    `outputs` says what the spec returns: an axis name (see `AXES`) for a single value, or a mapping from
    output name to axis for a dict (a dict whose keys depend on the model, such as per-parameter masks,
    declares its fixed keys and `"*": "elements"`), or a function of the options returning either. Trackers
    and reports format any spec from it; the tests check every built-in spec's outputs against it."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec_name = name or fn.__name__
        if spec_name in REGISTRY and not replace and REGISTRY[spec_name].fn is not fn:
            raise SpecError(f"a spec named {spec_name!r} is already defined; pass replace=True to redefine it")
        params = list(inspect.signature(fn).parameters.values())[1:]
        for p in params:
            if p.default is inspect.Parameter.empty:
                raise SpecError(f"spec {spec_name!r}: option {p.name!r} needs a default value")
        if not callable(outputs):
            _check_outputs(spec_name, outputs)
        defaults = tuple((p.name, p.default) for p in params)
        REGISTRY[spec_name] = SpecDef(spec_name, fn, tuple(deps), defaults, outputs, inspect.getdoc(fn) or "")
        return fn

    return deco


@dataclass(frozen=True, init=False)
class Spec:
    """A request for a spec with options, e.g. `Spec("group_lasso", weighted=False, key="gl_plain")`."""

    name: str
    options: tuple[tuple[str, Any], ...]
    key: str

    def __init__(self, name: str, key: str | None = None, **options: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        object.__setattr__(self, "key", key or name)

    def resolved(self) -> tuple[SpecDef, dict[str, Any]]:
        d = REGISTRY.get(self.name)
        if d is None:
            raise SpecError(f"unknown spec {self.name!r}; known specs: {', '.join(sorted(REGISTRY))}")
        allowed = dict(d.defaults)
        for k, _ in self.options:
            if k not in allowed:
                raise SpecError(
                    f"spec {self.name!r} has no option {k!r}; its options are: {', '.join(allowed) or '(none)'}"
                )
        return d, {**allowed, **dict(self.options)}


def as_spec(s: str | Spec) -> Spec:
    if isinstance(s, Spec):
        return s
    if isinstance(s, str):
        return Spec(s)
    raise SpecError(f"a spec must be a name or a wtcore.Spec, got {type(s).__name__}")


def spec_order(requests: list[Spec]) -> list[str]:
    """The requested specs and everything they declare they depend on, dependencies first."""
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
        raise SpecError(f"spec dependencies form a cycle: {nx.find_cycle(graph)}")
    return list(nx.lexicographical_topological_sort(graph))


@dataclass
class Context:
    """What a spec sees while emitting: the builder, the structure, its filtered slices, and dependencies."""

    b: Builder
    structure: Structure
    slices: dict[str, tuple[Slice, ...]]
    _memo: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = field(default_factory=dict)
    include: tuple[str, ...] | None = None  # the compile filters, for specs that select ops or parameters
    ignore: tuple[str, ...] = ()
    #: names of the entries of vector values (ops, parameters, groups, bins), set by `name_items`
    item_names: dict[Var, tuple[str, ...]] = field(default_factory=dict)

    def name_items(self, value: Var, names: Sequence[str]) -> Var:
        """Name the entries of a vector a spec returns (the ops, parameters, groups or bins it has one value
        for), so trackers and reports can label them (`Program.item_names`). Returns `value`."""
        self.item_names[value] = tuple(names)
        return value

    def selects(self, *names: str) -> bool:
        """Whether the compile filters keep something named `names` (a parameter and/or module name)."""
        if self.include is not None and not any(matches(self.include, n, "") for n in names):
            return False
        return not (self.ignore and any(matches(self.ignore, n, "") for n in names))

    def dep(self, name: str, **options: Any) -> Any:
        """Output of another spec (emitted once per distinct options, thanks to memoization and hash-consing)."""
        d, opts = Spec(name, **options).resolved()
        key = (d.name, tuple(sorted(opts.items())))
        if key not in self._memo:
            self._memo[key] = d.fn(self, **opts)
        return self._memo[key]

    def params_per_unit(self) -> Var:
        """Number of distinct parameter elements in each unit (after filters), float64 constant."""
        return self.b.unit_reduce("count")

    def unit_group_ids(self) -> Var:
        return self.cached_const("unit_group_ids", lambda: torch.repeat_interleave(
            torch.arange(len(self.structure.groups)), torch.tensor([g.size for g in self.structure.groups])
        ))

    def group_ends(self) -> Var:
        return self.cached_const(
            "group_ends", lambda: torch.cumsum(torch.tensor([g.size for g in self.structure.groups]), 0)
        )

    def prunable_units(self) -> Var:
        return self.cached_const("prunable_units", lambda: torch.cat(
            [torch.full((g.size,), g.prunable, dtype=torch.bool) for g in self.structure.groups]
        ))

    def cached_const(self, label: str, make: Callable[[], torch.Tensor]) -> Var:
        """A constant made once per compile (by `make`, called only the first time `label` is asked for)."""
        key = ("__const__", label)
        if key not in self._memo:
            self._memo[key] = self.b.const(make(), label)
        return self._memo[key]
