"""Channel shuffles (ShuffleNet): found in Torch-Pruning's graph and cut out of it."""

from __future__ import annotations

from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

from .nodes import TP_DUMMY, saved_dim, saved_sizes

__all__ = ["SHUFFLE_REASON", "cut_channel_shuffles"]

SHUFFLE_REASON = "its channels pass through a channel shuffle (view-transpose-view), which wt does not model"


def _shapes(node: Node) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(input shape, output shape) of a reshape node, from its saved sizes and autograd metadata."""
    fn = node.grad_fn
    sizes = saved_sizes(fn)
    try:
        out = tuple(int(d) for d in fn._input_metadata[0].shape)
    except Exception:
        return None
    return (tuple(int(d) for d in sizes), out) if sizes is not None else None


def _swaps_split_dims(node: Node) -> bool:
    """A transpose/permute of a 5-D tensor that swaps dims 1 and 2 (the two halves of a split channel dim)."""
    fn = node.grad_fn
    name = fn.name() if hasattr(fn, "name") else ""
    if name.startswith("TransposeBackward"):
        return {saved_dim(getattr(fn, "_saved_dim0", 0), 5), saved_dim(getattr(fn, "_saved_dim1", 0), 5)} == {1, 2}
    if name.startswith("PermuteBackward"):
        perm = [saved_dim(d, 5) for d in getattr(fn, "_saved_dims", ())]
        return len(perm) == 5 and perm[1] == 2 and perm[2] == 1
    return False


def _shuffle_chain(node: Node) -> list[Node] | None:
    """The nodes of a channel shuffle starting at reshape `node`, or None if `node` does not start one.

    A shuffle is a 4-D -> 5-D reshape splitting the channel dim, then element-wise nodes (contiguous, clone)
    among which a transpose/permute swaps the two halves of the split channel dim, then a 5-D -> 4-D reshape.
    """
    shapes = _shapes(node)
    if node.type != tp_ops.OPTYPE.RESHAPE or len(node.outputs) != 1 or shapes is None:
        return None
    src, dst = shapes
    if not (len(src) == 4 and len(dst) == 5 and dst[0] == src[0] and dst[1] * dst[2] == src[1]):
        return None
    chain, swapped, cur = [node], False, node.outputs[0]
    for _ in range(6):
        chain.append(cur)
        if cur.type == tp_ops.OPTYPE.RESHAPE:
            back = _shapes(cur)
            if swapped and back is not None and len(back[0]) == 5 and len(back[1]) == 4:
                return chain
        elif isinstance(cur.module, TP_DUMMY):
            swapped = swapped or _swaps_split_dims(cur)
        else:
            return None
        if len(cur.outputs) != 1:
            return None
        cur = cur.outputs[0]
    return None


def cut_channel_shuffles(module2node: dict) -> set[Node]:
    """Cut the graph inside every channel shuffle (`x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c,
    h, w)`, ShuffleNet). TP maps both reshapes as the identity, which couples the wrong channels across the
    shuffle (and, on torch 2.x, crashes its reshape shape inference on ShuffleNetV2); and removing one channel
    changes the permutation of all the others, so no single group's units can be pruned through it. Returns
    the shuffles' nodes: groups that touch them are marked not prunable."""
    barriers: set[Node] = set()
    for node in list(module2node.values()):
        chain = _shuffle_chain(node)
        if chain is None:
            continue
        nxt = chain[1]
        node.outputs.remove(nxt)
        nxt.inputs.remove(node)
        barriers.update(chain)
    return barriers

