"""Reading Torch-Pruning's graph nodes: their placeholder ops, the dims and sizes autograd saved for them, and
the model names nearest to a node (for error messages)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

__all__ = ["TP_DUMMY", "UNSIGNED_WRAP", "nearest_named", "saved_dim", "saved_sizes"]

#: TP's placeholder nodes for non-parametric ops: they carry no parameters and are skipped when lowering.
TP_DUMMY = (
    tp_ops._ConcatOp,
    tp_ops._SplitOp,
    tp_ops._ElementWiseOp,
    tp_ops._ReshapeOp,
    tp_ops._UnbindOp,
    tp_ops._ExpandOp,
    tp_ops._SliceOp,
    tp_ops._OutputOp,
)


#: a saved dim at or above it is a negative dim read back as unsigned (2**64 + d)
UNSIGNED_WRAP = 2**63


def saved_sizes(fn: Any) -> Any:
    """The input sizes autograd saved for a reshape/cat/split node (`_saved_self_sym_sizes` on recent torch),
    or None."""
    return getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)


def saved_dim(d: Any, rank: int) -> int:
    """A saved autograd dim as a non-negative int (negative dims may be read back as unsigned)."""
    d = int(d)
    if d >= UNSIGNED_WRAP:
        d -= 2**64
    return d + rank if d < 0 else d


def nearest_named(node: Node, names: Mapping[int, str], limit: int = 3) -> list[str]:
    """Names of the closest graph nodes (breadth-first over inputs and outputs) that are model modules or
    parameters, at most `limit`."""
    seen, frontier, found = {node}, [node], []
    while frontier and not found:
        nxt = []
        for n in frontier:
            for m in (*n.inputs, *n.outputs):
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
        found = sorted({names[id(m.module)] for m in nxt if id(m.module) in names})
        frontier = nxt
    return found[:limit]

