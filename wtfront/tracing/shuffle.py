"""Channel shuffles (ShuffleNet): found in Torch-Pruning's graph and modelled there as a channel permutation."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch_pruning import _helpers
from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

from .nodes import TP_DUMMY, saved_dim, saved_sizes

__all__ = ["ShuffleMapping", "find_channel_shuffles", "model_channel_shuffles"]


class ShuffleMapping:
    """Torch-Pruning index mapping across `x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)`:
    input channel `i * (c // g) + k` becomes output channel `k * g + i`.

    A shuffle of `c'` channels after pruning is the restriction of the original one only if every position `k`
    keeps or loses all its `g` channels (one per view group), so the mapping couples them: an input channel maps
    to the `g` output channels of its position, an output channel to the `g` input channels of its position.
    Units walked through it are therefore balanced across the view groups. `couples_channels` tells the group
    walk (`wtfront.tracing.groups`) that its units need closing (`wtfront.tracing.balance`)."""

    couples_channels = True

    def __init__(self, groups: int, channels: int, reverse: bool) -> None:
        self.groups, self.channels, self.reverse = groups, channels, reverse

    def map_arrays(self, idx: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mapping on (channel, root) arrays, de-duplicated."""
        g, per = self.groups, self.channels // self.groups
        if self.reverse:  # output -> input
            out = (idx // g)[:, None] + per * np.arange(g)[None, :]
        else:  # input -> output
            out = (idx % per)[:, None] * g + np.arange(g)[None, :]
        pairs = np.unique(np.stack([out.reshape(-1), np.repeat(root, g)], 1), axis=0)
        return pairs[:, 0], pairs[:, 1]

    def __call__(self, idxs: list[Any]) -> list[Any]:
        idx = np.fromiter((h.idx for h in idxs), dtype=np.int64, count=len(idxs))
        root = np.fromiter((-1 if h.root_idx is None else h.root_idx for h in idxs), dtype=np.int64, count=len(idxs))
        new, new_root = self.map_arrays(idx, root)
        return [_helpers._HybridIndex(int(i), None if r < 0 else int(r)) for i, r in zip(new, new_root)]


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
            if swapped and back is not None and len(back[0]) == 5 and len(back[1]) == 4 and back[1][1] == src[1]:
                return chain
        elif isinstance(cur.module, TP_DUMMY):
            swapped = swapped or _swaps_split_dims(cur)
        else:
            return None
        if len(cur.outputs) != 1:
            return None
        cur = cur.outputs[0]
    return None


def find_channel_shuffles(module2node: dict) -> list[tuple[list[Node], int, int]]:
    """Every channel shuffle of the traced graph, as (its nodes, view groups g, channels c), found from the
    recorded shapes and ops (a 4-D -> 5-D reshape of the channel dim, a transpose of the two split dims, a 5-D ->
    4-D reshape), not from module names. Its reshapes are retyped element-wise, so Torch-Pruning's reshape index
    mapping (a flatten guess, which crashes or couples the wrong channels here) leaves them alone."""
    found = []
    for node in list(module2node.values()):
        chain = _shuffle_chain(node)
        if chain is None:
            continue
        src, dst = _shapes(node)  # type: ignore[misc]
        for n in chain:
            n.type = tp_ops.OPTYPE.ELEMENTWISE
        found.append((chain, dst[1], src[1]))
    return found


def model_channel_shuffles(shuffles: list[tuple[list[Node], int, int]]) -> None:
    """Put a `ShuffleMapping` on the dependencies between a shuffle's first reshape and the next node (after
    Torch-Pruning built its dependencies; its index-mapping updates do not touch these edges)."""
    for chain, groups, channels in shuffles:
        first, nxt = chain[0], chain[1]
        for dep in first.dependencies:
            if dep.target is nxt:
                dep.index_mapping[0] = ShuffleMapping(groups, channels, reverse=False)
        for dep in nxt.dependencies:
            if dep.target is first:
                dep.index_mapping[0] = ShuffleMapping(groups, channels, reverse=True)
