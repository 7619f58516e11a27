"""Rotary position embeddings' rotate_half, which Torch-Pruning couples as if it were element-wise."""

from __future__ import annotations

from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

__all__ = ["ROTARY_REASON", "rotate_half_nodes"]

ROTARY_REASON = ("its channels pass through a rotary position embedding, whose rotate_half pairs entry d of each "
                 "head with entry d + head_dim/2, which Torch-Pruning couples as if element-wise; prune attention "
                 "heads instead")


def rotate_half_nodes(module2node: dict) -> set[Node]:
    """Concat nodes, and their slice/split nodes, that put slices (or chunks) of one tensor along the
    concatenated dim back together, possibly negated: `cat((-x[..., h:], x[..., :h]), -1)`, the rotate_half
    of rotary position embeddings. It permutes the entries of that dim; Torch-Pruning maps neither the
    slices nor the concat there (it reads them as element-wise), so entry d is coupled to itself instead of
    to its rotation partner, and zeroing a channel's slices would not remove it from the rotated queries
    and keys."""
    found: set[Node] = set()
    cuts = (tp_ops.OPTYPE.SLICE, tp_ops.OPTYPE.SPLIT)  # x[..., h:] and x.chunk(2, -1)
    for node in module2node.values():
        if node.type != tp_ops.OPTYPE.CONCAT or len(node.inputs) < 2:
            continue
        sources, dims, parts = set(), set(), []
        for inp in node.inputs:
            cur = inp
            for _ in range(3):  # through single-input element-wise ops (neg, scaling)
                if cur.type in cuts or len(cur.inputs) != 1 or not isinstance(cur.module, tp_ops._ElementWiseOp):
                    break
                cur = cur.inputs[0]
            if cur.type not in cuts or len(cur.inputs) != 1:
                break
            sources.add(cur.inputs[0])
            parts.append(cur)
            dims.add(cur.module.dim if cur.type == tp_ops.OPTYPE.SLICE else getattr(cur.grad_fn, "_saved_dim", None))
        else:
            cat_dim = getattr(node.grad_fn, "_saved_dim", None)
            if len(sources) == 1 and len(dims) == 1 and cat_dim in dims:
                found.add(node)
                found.update(parts)
    return found

