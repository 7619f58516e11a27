"""Programs on sharded parameters (FSDP2 / DTensor).

A program is straight-line torch code, so DTensor runs it as it is: a reduction over the rows of a
`Shard(0)` weight stays local to each shard, one over its columns becomes a `Partial` sum, and only the
unit-sized vectors those produce cross ranks when they meet a replicated value. What DTensor needs is that
every operand is a DTensor on the same mesh: the program's constants (index vectors, sizes, MACs) and any
plain parameter are wrapped as replicated, which costs no communication (every rank holds them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

__all__ = ["CollectiveLog", "as_dtensors", "grads_placed", "mesh_of", "placed_like", "to_local"]


def mesh_of(tensors: Sequence[torch.Tensor]):  # -> DeviceMesh | None
    """The device mesh of the first DTensor among `tensors`, or None when none is one."""
    for t in tensors:
        if isinstance(t, DTensor):
            return t.device_mesh
    return None


def as_dtensors(tensors: Sequence[torch.Tensor], mesh) -> list[torch.Tensor]:
    """`tensors` with every plain tensor wrapped as a DTensor replicated over `mesh` (no communication)."""
    placements = [Replicate()] * mesh.ndim
    out = []
    for t in tensors:
        if isinstance(t, DTensor):
            if t.device_mesh != mesh:
                raise ValueError(f"parameters live on different device meshes ({t.device_mesh} and {mesh}); "
                                 "a wt program takes parameters sharded over one mesh")
            out.append(t)
        else:
            out.append(DTensor.from_local(t.to(mesh.device_type), mesh, placements, run_check=False))
    return out


class _GradAsPlaced(torch.autograd.Function):
    """Identity whose backward gives the gradient the placements of the input: FSDP2 adds its own sharded
    gradient to `param.grad` shard by shard, so a program's gradient must arrive sharded like the parameter
    (a replicated gradient is sliced locally, no communication)."""

    @staticmethod
    def forward(ctx, x: DTensor) -> DTensor:
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(ctx.placements):
            return g.redistribute(ctx.mesh, ctx.placements)
        return g


def grads_placed(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`params` (DTensors) whose gradients flow back with each parameter's own placements."""
    return [_GradAsPlaced.apply(p) if isinstance(p, DTensor) and p.requires_grad and torch.is_grad_enabled() else p
            for p in params]


def placed_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` (a whole tensor every rank holds, e.g. a mask) as a DTensor placed like `ref` when `ref` is one:
    each rank keeps its own part, no communication; `t` itself otherwise."""
    if not isinstance(ref, DTensor):
        return t
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def to_local(outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Program results as plain tensors, the same on every rank (a differentiable redistribution to
    `Replicate`: an all-reduce of a `Partial` value or an all-gather of a `Shard` one, unit-sized)."""
    return [o.full_tensor() if isinstance(o, DTensor) else o for o in outs]


class CollectiveLog(CommDebugMode):
    """`CommDebugMode` that also records every collective's name and result size: how a test or a benchmark
    shows that a program on sharded parameters communicates unit-sized vectors only."""

    _NAMESPACES = frozenset({"_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d"})

    def __init__(self) -> None:
        super().__init__()
        #: (collective name, elements, bytes) of each collective, in order
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = getattr(func, "namespace", "")
        skip = "wait" in func.__name__ or "wrap" in func.__name__  # completions and autograd wrappers
        if name in self._NAMESPACES and not skip and out is not NotImplemented:
            results = [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]
            self.calls.append((func.__name__, sum(t.numel() for t in results),
                               sum(t.numel() * t.element_size() for t in results)))
        return out

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b in self.calls)

    @property
    def largest(self) -> int:
        """Elements of the largest single collective result (0 when none ran)."""
        return max((n for _, n, _ in self.calls), default=0)
