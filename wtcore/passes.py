"""The compiler's passes after lowering, and the verifier that checks a graph between passes.

Each pass is a function `(graph) -> None` that rewrites `graph.eqns` (and its constants and outputs) and
leaves a valid graph: every value defined once, before it is read, by a known primitive with fitting
operands and parameters (`verify`). The order they run in is `wtcore.compiler.PASSES`.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

from .errors import StructureError
from .interpret import apply_eqn
from .lang import LEAVES, MACROS, Eqn, Graph, Var, check_eqn

__all__ = ["batch_nonzero_stats", "eliminate_dead_code", "fold_constants", "schedule", "verify"]


def schedule(g: Graph) -> None:
    """Order the equations parameter by parameter: a topological sort that always runs the ready equation
    whose inputs come from the earliest parameter. Specs emit spec by spec (all parameters for N:M, then all
    for sparsity, ...), which would keep every parameter's large intermediates alive to the end of the
    program; in this order each is produced, reduced and freed before the next parameter is read, and stays
    in cache while it is reused."""
    eqns = g.eqns
    first_param: dict[str, int] = {}
    for e in eqns:
        if e.prim == "param":
            first_param.setdefault(e.kwargs["name"], len(first_param))
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
        r = first_param[e.kwargs["name"]] if e.prim == "param" else max((rank[v] for v in deps_of[i]), default=-1)
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
    g.eqns = [eqns[i] for i in order]


def fold_constants(g: Graph) -> None:
    """Evaluate at compile time every equation whose operands are all constants (what depends on the IR
    only: index tables, unit counts, cost vectors), with the primitive's own implementation."""
    env: dict[Var, Any] = dict(g.consts)
    out = []
    for e in g.eqns:
        if e.prim not in LEAVES and all(v in env for v in e.vars):
            with torch.no_grad():
                value = apply_eqn(e, env)
            if isinstance(value, torch.Tensor):
                env[e.out] = g.consts[e.out] = value
                g.labels[e.out] = f"folded {e.prim}"
                out.append(Eqn(e.out, "const", (), (("label", g.labels[e.out]),)))
                continue
            env[e.out] = value  # a tuple: its `item`s fold
        out.append(e)
    g.eqns = out


def eliminate_dead_code(g: Graph) -> None:
    """Drop every equation no output depends on (and its constant)."""
    live = {v for _, v in g.outputs}
    keep = []
    for e in reversed(g.eqns):
        if e.out in live:
            keep.append(e)
            live.update(e.vars)
    g.eqns = keep[::-1]
    g.consts = {v: t for v, t in g.consts.items() if v in live}
    g.labels = {v: t for v, t in g.labels.items() if v in live}


def batch_nonzero_stats(g: Graph) -> None:
    """Merge the per-weight `nonzero_stats` of a program into ONE call per (tolerance, m, keep): one native
    call reads every weight and balances its threads across them, and a compiled program makes one opaque
    call. Each weight's `item`s become `narrow`s of the batch's two outputs. The batch needs every weight it
    reads, so the leaves move to the front (their order only numbers the program's inputs) and the batches
    follow them."""
    stats = [e for e in g.eqns if e.prim == "nonzero_stats" and len(e.inputs) == 1]
    if not stats:
        return
    items: dict[Var, list[Eqn]] = {e.out: [] for e in stats}
    for e in g.eqns:
        if e.prim == "item" and e.vars and e.vars[0] in items:
            items[e.vars[0]].append(e)
    used_otherwise = {v for e in g.eqns if e.prim != "item" for v in e.vars if v in items}
    used_otherwise |= {v for _, v in g.outputs if v in items}
    batches: dict[tuple[Any, ...], list[Eqn]] = {}
    for e in stats:
        if e.out not in used_otherwise:
            batches.setdefault(e.params, []).append(e)
    head = [e for e in g.eqns if e.prim in LEAVES]
    weight = {e.out: e.kwargs["name"] for e in head if e.prim == "param"}
    rewrite: dict[Var, Eqn] = {}
    gone: set[Var] = set()
    for params, group in batches.items():
        if len(group) < 2:
            continue
        batch = g.new_var()
        head.append(Eqn(batch, "nonzero_stats", tuple(e.inputs[0] for e in group), params))
        parts = [g.new_var(), g.new_var()]
        head += [Eqn(parts[i], "item", (batch,), (("index", i),)) for i in (0, 1)]
        row = col = 0
        for e in group:
            name = weight.get(e.inputs[0])  # type: ignore[arg-type]
            if name is None:
                raise StructureError(f"internal: {e} reads a value that is not a parameter")
            rows, cols = g.structure.param_map[name].shape[:2]  # type: ignore[union-attr]
            for it in items[e.out]:
                index = it.kwargs["index"]
                dim, start, length = (1, row, rows) if index == 0 else (0, col, cols)
                rewrite[it.out] = Eqn(it.out, "narrow", (parts[index],),
                                      (("dim", dim), ("length", length), ("start", start)))
            gone.add(e.out)
            row, col = row + rows, col + cols
    g.eqns = head + [rewrite.get(e.out, e) for e in g.eqns if e.prim not in LEAVES and e.out not in gone]


def verify(g: Graph, lowered: bool = True) -> None:
    """Raise unless `g` is well formed: each value defined once and before it is read, every primitive known
    and called with fitting operands and parameters, every constant present, every output defined; once
    `lowered`, no macro is left."""
    defined: set[Var] = set()
    for e in g.eqns:
        if e.out in defined:
            raise StructureError(f"internal: {e.out!r} is defined twice ({e})")
        missing = [v for v in e.vars if v not in defined]
        if missing:
            raise StructureError(f"internal: {e} reads {missing} before they are defined")
        if e.prim == "const":
            if e.out not in g.consts:
                raise StructureError(f"internal: constant {e.out!r} has no value")
        elif e.prim == "param":
            if "name" not in e.kwargs:
                raise StructureError(f"internal: {e} names no parameter")
        elif e.prim in MACROS:
            if lowered:
                raise StructureError(f"internal: {e} is left after lowering")
        else:
            check_eqn(e.prim, e.inputs, e.kwargs)
        defined.add(e.out)
    for key, v in g.outputs:
        if v not in defined:
            raise StructureError(f"internal: output {key!r} ({v!r}) is not defined")
