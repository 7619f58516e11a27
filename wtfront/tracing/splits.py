"""Channel splits and slices that make a group not prunable.

Torch-Pruning reads a split's part sizes from `_saved_split_sizes` or `_saved_self_sizes`; `chunk`'s
`SplitBackward0` saves neither (it has `_saved_split_size` and `_saved_self_sym_sizes`), so TP infers each
part's size from the layer it feeds and takes the parts in the order it met their consumers. EdgeNeXt's split
convs (`x.chunk(2, dim=1)`: part 0 through a depthwise conv, part 1 straight to a `cat`) then get the offsets
[0, 48, 72] for 48 channels. `graph.DependencyGraph` gives every channel chunk its real part sizes
(`graph.chunk_sizes`), so TP's split index mappings follow the forward.

The forward re-splits by `chunk(n)` (parts from the width) or by sizes fixed in code, and slices to a fixed
end (GhostNet's `cat(...)[:, :out]`): removing channels would move the parts, so a group through a channel
split, or a slice that drops channels, is not prunable (`SPLIT_REASON`). The chunks after a channel shuffle
are the exception: their groups' units are balanced over the pieces (`balance`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

__all__ = ["SPLIT_REASON", "channel_splits"]

SPLIT_REASON = (
    "its channels pass through a channel split or slice (chunk, split, x[:, :n]), whose parts the "
    "forward derives from the width or fixes in code: removing units would move them, so they stay whole"
)


def _narrows(node: Node) -> bool:
    """A slice of the channel dim that drops channels (GhostNet's `cat(...)[:, :out]` with an odd `out`)."""
    sizes, m = getattr(node.grad_fn, "_saved_self_sym_sizes", None), node.module
    if sizes is None or len(sizes) not in (2, 3, 4):
        return False
    channels = 2 if len(sizes) == 3 else 1  # the dim TP maps as channels: [B, C], [B, N, C], [B, C, H, W]
    if getattr(m, "dim", None) != channels:
        return False
    start, end, step = (getattr(m, a, None) for a in ("start", "end", "step"))
    if not all(isinstance(v, int) for v in (start, end, step)):
        return True  # a slice TP could not read: assume it moves
    return start > 0 or step > 1 or end < int(sizes[channels])


def channel_splits(module2node: Mapping[Any, Node], balanced: Collection[Node] = ()) -> set[Node]:
    """Every split node of the channel dim and every slice that narrows it, except the `balanced` chunks (after
    a channel shuffle): a group through one is not prunable (`SPLIT_REASON`)."""
    found: set[Node] = set()
    for node in module2node.values():
        if node in balanced:
            continue
        if node.type == tp_ops.OPTYPE.SLICE and _narrows(node):
            found.add(node)
        elif node.type == tp_ops.OPTYPE.SPLIT and getattr(node.grad_fn, "_saved_dim", None) == 1:
            found.add(node)
    return found
