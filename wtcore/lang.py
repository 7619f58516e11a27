"""The program language: a straight-line list of equations over values (in the spirit of a jaxpr).

An equation `Eqn(out, prim, inputs, params)` applies a primitive (`wtcore.primitives`) to operands
(`inputs`: values of the program or Python number literals) with static parameters (`params`: shapes,
dims, tolerances, fixed at compile time). Two kinds of leaves bring values in: `param` (a tensor of the
parameter dict, by canonical name) and `const` (a tensor computed at compile time). One macro, `unit_reduce`
(a per-unit reduction over every slice of the structure), is emitted by specs and replaced by primitives in
the compiler's first pass.

Specs emit equations through a `Builder`, which hash-conses: the same primitive on the same operands and
parameters gives the same `Var`, so a reduction several specs ask for is computed once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SpecError
from .ir import Slice, Structure
from .primitives import PRIMITIVES

__all__ = ["LEAVES", "MACROS", "Builder", "Eqn", "Graph", "Literal", "Var", "toposort"]

#: equations that bring values in: no operands
LEAVES = frozenset({"param", "const"})
#: equations the compiler replaces by primitives before anything else runs
MACROS = frozenset({"unit_reduce"})
#: `unit_reduce` kinds computed from the parameters, and the one computed at compile time
UNIT_REDUCE_KINDS = ("sumsq", "abssum", "nnz", "active", "count")

Literal = float | int | bool


@dataclass(frozen=True, eq=False)
class Var:
    """A value of a program. A graph creates each id once, so identity is equality (the built-in identity
    hash and comparison run in C; the compiler passes hash every Var many times)."""

    id: int

    def __repr__(self) -> str:
        return f"v{self.id}"


@dataclass(frozen=True)
class Eqn:
    """`out = prim(*inputs, **params)`; `vars` are the `Var`s among the inputs, in order."""

    out: Var
    prim: str
    inputs: tuple[Var | Literal, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    vars: tuple[Var, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vars", tuple(a for a in self.inputs if isinstance(a, Var)))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def __str__(self) -> str:
        args = [repr(a) for a in self.inputs] + [f"{k}={v!r}" for k, v in self.params]
        return f"{self.out!r} = {self.prim}({', '.join(args)})"


@dataclass
class Graph:
    """A program under construction: equations in a valid order, the compile-time constants, the outputs."""

    eqns: list[Eqn] = field(default_factory=list)
    consts: dict[Var, torch.Tensor] = field(default_factory=dict)
    labels: dict[Var, str] = field(default_factory=dict)
    outputs: list[tuple[str, Var]] = field(default_factory=list)
    #: the names of the entries of vector outputs (ops, parameters, groups, bins), by output key
    item_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    next_id: int = 0
    #: the IR the program is compiled over, and the slices the compile filters keep (per group)
    structure: Structure | None = None
    slices: Mapping[str, tuple[Slice, ...]] = field(default_factory=dict)
    #: hash-consing table of the builders emitting into this graph (equation key -> its value)
    memo: dict[tuple[Any, ...], Var] = field(default_factory=dict, repr=False)

    def new_var(self) -> Var:
        v = Var(self.next_id)
        self.next_id += 1
        return v


def toposort(g: Graph) -> None:
    """Reorder `g.eqns` so every value is defined before it is read, keeping the given order where it is
    already valid (a depth-first walk that visits inputs first)."""
    by_out = {e.out: e for e in g.eqns}
    done: set[Var] = set()
    order: list[Eqn] = []
    for root in g.eqns:
        if root.out in done:
            continue
        stack = [(root, 0)]
        while stack:
            e, i = stack.pop()
            if i < len(e.vars):
                stack.append((e, i + 1))
                v = e.vars[i]
                if v not in done and v in by_out:
                    stack.append((by_out[v], 0))
            elif e.out not in done:
                done.add(e.out)
                order.append(e)
    g.eqns = order


def _key(a: Any) -> Any:
    """A memo key that tells `1`, `1.0`, `True` and `-0.0` apart (they compare equal in Python)."""
    return a if isinstance(a, Var) else (type(a), repr(a))


def check_eqn(prim: str, inputs: tuple[Any, ...], params: Mapping[str, Any]) -> None:
    """Raise `SpecError` unless `prim` is a primitive and the operands and parameters fit its signature."""
    p = PRIMITIVES.get(prim)
    if p is None:
        known = sorted(PRIMITIVES)
        raise SpecError(f"unknown primitive {prim!r}; known: {known}")
    if p.arity is not None and len(inputs) != p.arity:
        raise SpecError(f"primitive {prim!r} takes {p.arity} operand(s), got {len(inputs)}")
    extra = set(params) - p.params
    missing = p.required - set(params)
    if extra or missing:
        raise SpecError(f"primitive {prim!r}: unknown parameter(s) {sorted(extra)}, missing {sorted(missing)}; "
                        f"its parameters are {sorted(p.params)}")
    for a in inputs:
        if not isinstance(a, (Var, float, int, bool)):
            raise SpecError(f"primitive {prim!r}: an operand must be a Var or a number, got {type(a).__name__} "
                            f"(tensors enter a program through Builder.const)")


class Builder:
    """Emits equations into a `Graph`, with hash-consing. Specs use it through `ctx.b`."""

    def __init__(self, graph: Graph | None = None) -> None:
        self.graph = graph if graph is not None else Graph()
        self._memo = self.graph.memo
        self._const_ids: dict[int, Var] = {}

    @property
    def eqns(self) -> list[Eqn]:
        return self.graph.eqns

    def _add(self, prim: str, inputs: tuple[Any, ...], params: tuple[tuple[str, Any], ...]) -> Var:
        key = (prim, tuple(_key(a) for a in inputs), repr(params))
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        v = self.graph.new_var()
        self.graph.eqns.append(Eqn(v, prim, inputs, params))
        self._memo[key] = v
        return v

    def emit(self, prim: str, *inputs: Var | Literal, **params: Any) -> Var:
        """`prim(*inputs, **params)`: operands positional, static parameters by keyword."""
        check_eqn(prim, inputs, params)
        defaults = PRIMITIVES[prim].defaults
        return self._add(prim, inputs, tuple(sorted((k, v) for k, v in params.items()
                                                     if k not in defaults or v != defaults[k])))

    def param(self, name: str) -> Var:
        """The parameter with this canonical name."""
        return self._add("param", (), (("name", name),))

    def const(self, value: torch.Tensor | float | int, label: str = "") -> Var:
        """A compile-time tensor (kept on the program, moved to the parameters' device on first use)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        hit = self._const_ids.get(id(t))
        if hit is not None:
            return hit
        v = self.graph.new_var()
        self.graph.consts[v] = t
        self.graph.labels[v] = label
        self._const_ids[id(t)] = v
        self.graph.eqns.append(Eqn(v, "const", (), (("label", label),)))
        return v

    def unit_reduce(self, kind: str, tolerance: float = 0.0) -> Var:
        """Per-unit reduction over every (filtered) slice: a `[num_units]` vector.

        kinds: "sumsq" (sum of squares), "abssum" (sum of |w|), "nnz" (count of |w| > tolerance), "active"
        (> 0 exactly when some element has |w| > tolerance; not a count: the cheapest test), "count"
        (parameter elements per unit, a compile-time constant). A macro: the compiler's first pass lowers
        every kind of a program into dense per-parameter reductions and one shared `scatter_add`.
        """
        if kind not in UNIT_REDUCE_KINDS:
            raise SpecError(f"unknown unit_reduce kind {kind!r}; known: {UNIT_REDUCE_KINDS}")
        params = (("kind", kind),) if kind in ("sumsq", "abssum", "count") else \
            (("kind", kind), ("tolerance", float(tolerance)))
        return self._add("unit_reduce", (), params)

    def lookup(self, prim: str, *inputs: Any, **params: Any) -> Var | None:
        """The value of `prim(*inputs, **params)` if something emitted it already, else None."""
        return self._memo.get((prim, tuple(_key(a) for a in inputs), repr(tuple(sorted(params.items())))))

    # ------------------------------------------------------------------ the common primitives, typed
    def add(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("add", a, b)

    def sub(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("sub", a, b)

    def mul(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("mul", a, b)

    def div(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("div", a, b)

    def maximum(self, a: Var, b: Var | Literal) -> Var:
        return self.emit("maximum", a, b)

    def minimum(self, a: Var, b: Var | Literal) -> Var:
        return self.emit("minimum", a, b)

    def gt(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("gt", a, b)

    def ge(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("ge", a, b)

    def lt(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("lt", a, b)

    def eq(self, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("eq", a, b)

    def logical_or(self, a: Var, b: Var) -> Var:
        return self.emit("logical_or", a, b)

    def logical_and(self, a: Var, b: Var) -> Var:
        return self.emit("logical_and", a, b)

    def logical_not(self, a: Var) -> Var:
        return self.emit("logical_not", a)

    def where(self, c: Var, a: Var | Literal, b: Var | Literal) -> Var:
        return self.emit("where", c, a, b)

    def square(self, x: Var) -> Var:
        return self.emit("square", x)

    def abs(self, x: Var) -> Var:
        return self.emit("abs", x)

    def sqrt(self, x: Var) -> Var:
        return self.emit("sqrt", x)

    def safe_sqrt(self, x: Var) -> Var:
        return self.emit("safe_sqrt", x)

    def sum(self, x: Var, dims: tuple[int, ...] | None = None) -> Var:
        return self.emit("sum", x, dims=dims)

    def cast(self, x: Var, dtype: str) -> Var:
        return self.emit("cast", x, dtype=dtype)

    def to_long(self, x: Var) -> Var:
        return self.emit("cast", x, dtype="int64")

    def to_float64(self, x: Var) -> Var:
        return self.emit("cast", x, dtype="float64")

    def cast_like(self, x: Var, like: Var) -> Var:
        return self.emit("cast_like", x, like)

    def reshape(self, x: Var, shape: tuple[int, ...]) -> Var:
        return self.emit("reshape", x, shape=tuple(shape))

    def cat(self, *xs: Var) -> Var:
        """Concatenation along dim 0 (the value itself for one part)."""
        return xs[0] if len(xs) == 1 else self.emit("cat", *xs)

    def take(self, x: Var, index: Var) -> Var:
        return self.emit("take", x, index)

    def segment_sum_sorted(self, x: Var, ends: Var) -> Var:
        return self.emit("segment_sum_sorted", x, ends)
