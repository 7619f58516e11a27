"""Compile calculation specs over a `Structure` into a `Program`.

1. The requested specs and their declared dependencies are ordered as a DAG.
2. Each spec emits equations through one hash-consing builder (what several specs need is emitted once).
3. The passes of `PASSES` run in order, each a small function of the graph (`wtcore.lowering`,
   `wtcore.passes`); `verify=True` checks the graph after each one.
4. `wtcore.codegen` writes the Python function; `Program` runs it (optionally under `torch.compile`).

Programs are cached by (structure fingerprint, specs, filters, backend).
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import lowering
from . import passes as _passes
from .codegen import generate
from .errors import SpecError
from .filters import select_slices
from .ir import Structure
from .lang import Builder, Graph, Var
from .program import Program
from .spec import REGISTRY, Context, Spec, as_spec, spec_order

__all__ = ["PASSES", "clear_cache", "compile", "lower"]


#: The passes, in the order they run. Lowering replaces the `unit_reduce` macro; scheduling orders the
#: equations parameter by parameter; folding evaluates what depends on the IR only; dead-code elimination
#: drops what no output reads; batching merges the weights' `nonzero_stats` into one call per
#: (tolerance, m, keep).
PASSES: tuple[Callable[[Graph], None], ...] = (
    lowering.lower_unit_reduce,
    _passes.schedule,
    _passes.fold_constants,
    _passes.eliminate_dead_code,
    _passes.batch_nonzero_stats,
)

#: Compiled programs by (structure fingerprint, specs, filters, backend); least recently used first out, so
#: a long run that re-traces after every pruning step does not keep every old program's constants alive.
_CACHE: OrderedDict[tuple[Any, ...], Program] = OrderedDict()
CACHE_SIZE = 64


def clear_cache() -> None:
    _CACHE.clear()


def _requests(specs: Sequence[str | Spec] | str | Spec) -> list[Spec]:
    if isinstance(specs, (str, Spec)):
        specs = [specs]
    requests = [as_spec(s) for s in specs]
    if not requests:
        raise SpecError("compile() needs at least one spec")
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise SpecError(f"two requested specs share an output key: {keys}; pass key= to tell them apart")
    return requests


def lower(structure: Structure, specs: Sequence[str | Spec] | str | Spec, include: Iterable[str] | None = None,
          ignore: Iterable[str] | None = None, verify: bool = False,
          passes: Sequence[Callable[[Graph], None]] = PASSES) -> Graph:
    """The graph of `specs` after `passes` (`compile` without code generation: every pass by default, `()`
    for what the specs emitted); `verify` checks it after emission and after each pass."""
    requests = _requests(specs)
    resolved = [r.resolved() for r in requests]  # validates names and options
    inc = tuple(include) if include is not None else None
    ign = tuple(ignore or ())
    slices = select_slices(structure, inc, ign)
    g = Graph(structure=structure, slices=slices)
    ctx = Context(Builder(g), structure, slices, include=inc, ignore=ign)
    rank = {n: i for i, n in enumerate(spec_order(requests))}
    values: dict[str, Any] = {}
    for r, (d, opts) in sorted(zip(requests, resolved), key=lambda x: rank[x[0].name]):
        values[r.key] = ctx.dep(d.name, **opts)
    for r in requests:
        value = values[r.key]
        if isinstance(value, Var):
            g.outputs.append((r.key, value))
        elif isinstance(value, Mapping):
            g.outputs.extend((f"{r.key}/{k}", v) for k, v in value.items())
        else:
            raise SpecError(f"spec {r.name!r} returned {type(value).__name__}; a spec returns a Var or a dict of Vars")
    g.item_names = {key: ctx.item_names[v] for key, v in g.outputs if v in ctx.item_names}
    if verify:
        _passes.verify(g, lowered=False)
    for run in passes:
        run(g)
        if verify:
            try:
                _passes.verify(g, lowered=True)
            except Exception as e:
                raise type(e)(f"after pass {run.__name__!r}: {e}") from e
    return g


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
    requests = _requests(specs)
    for r in requests:
        r.resolved()
    inc = tuple(include) if include is not None else None
    ign = tuple(ignore or ())
    key = (structure.fingerprint, tuple((r.name, r.options, r.key, id(REGISTRY[r.name].fn)) for r in requests),
           inc, ign, backend)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    # the passes allocate many small objects and free none in cycles: a full collection triggered half-way
    # walks the whole heap (a model's worth of objects) for nothing
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        g = lower(structure, requests, inc, ign)
        program = Program(structure, generate(g), g.eqns, g.outputs, g.labels, g.item_names, backend=backend)
    finally:
        if gc_was_enabled:
            gc.enable()
    _CACHE[key] = program
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return program
