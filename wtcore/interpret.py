"""The reference interpreter: what a program means, in a few lines.

`interpret(program, params)` walks the equations in order and applies each primitive's implementation to
its operands and static parameters. Generated code (`program(params)`) does exactly this, unrolled into
Python source; the tests check that the two agree. The constant folder and the shape/dtype inference of
`print(program)` use the same `apply_eqn`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from .ir import Structure
from .lang import Eqn, Var
from .primitives import PRIMITIVES


class Program(Protocol):
    """What the interpreter reads of a `wtcore.Program`."""

    structure: Structure
    eqns: tuple[Eqn, ...]
    param_names: tuple[str, ...]
    outputs: tuple[tuple[str, Var], ...]

    def gather(self, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]: ...

    def consts_on(self, device: torch.device) -> list[torch.Tensor]: ...

__all__ = ["apply_eqn", "interpret", "value_types"]


def apply_eqn(e: Eqn, env: Mapping[Var, Any]) -> Any:
    """The value of a (non-leaf) equation, its operands read from `env`."""
    args = [env[a] if isinstance(a, Var) else a for a in e.inputs]
    return PRIMITIVES[e.prim].impl(*args, **dict(e.params))


def evaluate(program: Program, inputs: Sequence[torch.Tensor], consts: Sequence[torch.Tensor]) -> dict[Var, Any]:
    """Every value of `program` from its inputs (in `program.param_names` order) and constants."""
    by_name = dict(zip(program.param_names, inputs))
    next_const = iter(consts)
    env: dict[Var, Any] = {}
    for e in program.eqns:
        if e.prim == "param":
            env[e.out] = by_name[e.kwargs["name"]]
        elif e.prim == "const":
            env[e.out] = next(next_const)
        else:
            env[e.out] = apply_eqn(e, env)
    return env


def interpret(program: Program, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`program(params)`, computed by walking the equations one by one (slow, obviously faithful)."""
    inputs = program.gather(params)
    device = inputs[0].device if inputs else torch.device("cpu")
    env = evaluate(program, inputs, program.consts_on(device))
    return {key: env[v] for key, v in program.outputs}


def value_types(program: Program) -> dict[Var, Any]:
    """Shape and dtype of every value, from evaluating the program on `meta` tensors of the structure's
    parameter shapes and dtypes (no data is read)."""
    pmap = program.structure.param_map
    inputs = [torch.empty(pmap[n].shape, dtype=getattr(torch, pmap[n].dtype, torch.float32), device="meta")
              for n in program.param_names]
    consts = [c.to("meta") for c in program.consts_on(torch.device("cpu"))]
    with torch.no_grad():
        return evaluate(program, inputs, consts)
