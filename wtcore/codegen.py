"""Python source from a lowered graph: one statement per equation, each a call of the primitive's function.

    def wt_program(P, C):
        v12 = sumsq_pairs(P[0], P[3], ..., layouts=K[0])  # P[0]: conv1.weight, ...
        v13 = cat(v11, v12)
        del v11, v12
        ...
        return (v40, v52)

Parameters and constants are read in place (`P[i]`, `C[k]`: the lists hold them anyway); every other value
is a local, freed with `del` right after its last use, so large temporaries are released as early as in
hand-written code. Static parameters are written as literals, or, when long, as entries of a tuple `K`
bound in the function's namespace. Every operand appears once in its statement, so each equation is
evaluated once per call. The source is registered with `linecache`, so a traceback through a program
shows its line.
"""

from __future__ import annotations

import ast
import itertools
import linecache
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lang import Graph, Var
from .primitives import PRIMITIVES

__all__ = ["Generated", "generate", "load"]

WIDTH = 100  # wrap a statement longer than this (no generated line exceeds ~WIDTH + one operand)
_LITERAL_MAX = 48  # longer static values go to K
_COUNTER = itertools.count()


@dataclass(frozen=True)
class Generated:
    code: str
    param_names: tuple[str, ...]
    consts: tuple[torch.Tensor, ...]
    statics: tuple[Any, ...]  # the `K` entries


def _number(x: float | int | bool) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return f"float({str(x)!r})"
    return repr(x)


def _is_literal(text: str, value: Any) -> bool:
    try:
        return ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        return False


def _wrap(head: str, args: Sequence[str], indent: str = "    ") -> list[str]:
    """`head(arg, arg, ...)` on one line, or its arguments wrapped over several lines of at most WIDTH."""
    one = f"{indent}{head}({', '.join(args)})"
    if len(one) <= WIDTH:
        return [one]
    lines, cur = [f"{indent}{head}("], indent + "    "
    for i, a in enumerate(args):
        piece = a + ("," if i < len(args) - 1 else ")")
        if len(cur) + len(piece) + 1 > WIDTH and cur.strip():
            lines.append(cur.rstrip())
            cur = indent + "    "
        cur += piece + " "
    lines.append(cur.rstrip())
    return lines


def generate(g: Graph) -> Generated:
    """The source of `wt_program(P, C)` for a lowered, ordered graph."""
    param_names = tuple(dict.fromkeys(e.kwargs["name"] for e in g.eqns if e.prim == "param"))
    param_pos = {n: i for i, n in enumerate(param_names)}
    const_vars = [e.out for e in g.eqns if e.prim == "const"]
    src: dict[Var, str] = {}
    for e in g.eqns:
        if e.prim == "param":
            src[e.out] = f"P[{param_pos[e.kwargs['name']]}]"
    for k, v in enumerate(const_vars):
        src[v] = f"C[{k}]"
    body = [e for e in g.eqns if e.out not in src]
    outputs = {v for _, v in g.outputs}
    last_use: dict[Var, int] = {}
    for i, e in enumerate(body):
        for v in e.vars:
            last_use[v] = i
    statics: list[Any] = []

    def static(value: Any) -> str:
        text = repr(value)
        if len(text) <= _LITERAL_MAX and _is_literal(text, value):
            return text
        statics.append(value)
        return f"K[{len(statics) - 1}]"

    lines = ["def wt_program(P, C):"]
    lines += [f"    # P[{i}]: {n}" for i, n in enumerate(param_names)]
    lines += [f"    # C[{k}]: {g.labels.get(v, '')}" for k, v in enumerate(const_vars)]
    for i, e in enumerate(body):
        args = [src.get(a, repr(a)) if isinstance(a, Var) else _number(a) for a in e.inputs]
        args += [f"{k}={static(v)}" for k, v in e.params]
        stmt = _wrap(f"{e.out!r} = {e.prim}", args)
        lines += stmt
        dead = sorted({v for v in e.vars if v not in src and last_use[v] == i and v not in outputs},
                      key=lambda v: v.id)
        for j in range(0, len(dead), 12):
            lines.append("    del " + ", ".join(repr(v) for v in dead[j:j + 12]))
    returned = [src.get(v, repr(v)) for _, v in g.outputs]
    lines += _wrap("return ", [*returned[:-1], returned[-1] + ","] if returned else [])
    code = "\n".join(lines) + "\n"
    return Generated(code, param_names, tuple(g.consts[v] for v in const_vars), tuple(statics))


def load(gen: Generated, name: str) -> Any:
    """The function `wt_program` defined by `gen.code`, with its source registered for tracebacks."""
    filename = f"<wt program {name} #{next(_COUNTER)}>"
    linecache.cache[filename] = (len(gen.code), None, gen.code.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {p.name: p.impl for p in PRIMITIVES.values()}
    namespace["K"] = gen.statics
    exec(compile(gen.code, filename, "exec"), namespace)
    return namespace["wt_program"]
