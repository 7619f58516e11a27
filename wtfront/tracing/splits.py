"""Channel splits (`chunk`, `split`) with the sizes and order the forward used; channel splits and slices that
make a group not prunable.

Torch-Pruning reads a split's part sizes from `_saved_split_sizes` or `_saved_self_sizes`; `chunk`'s
`SplitBackward0` saves neither (it has `_saved_split_size` and `_saved_self_sym_sizes`), so TP infers each
part's size from the layer it feeds and takes the parts in the order it met their consumers. EdgeNeXt's split
convs (`x.chunk(2, dim=1)`: part 0 through a depthwise conv, part 1 straight to a `cat`) then get the offsets
[0, 48, 72] for 48 channels: the `cat` counted as a 48-channel part, the conv as the second. `fix_split_sizes`
gives such nodes their real part sizes and orders their outputs by part (the autograd edge's `output_nr`),
so TP's split index mappings follow the forward.

The forward re-splits by `chunk(n)` (parts from the width) or by sizes fixed in code, and slices to a fixed
end (GhostNet's `cat(...)[:, :out]`): removing channels would move the parts, so a group through a channel
split, or a slice that drops channels, is not prunable (`SPLIT_REASON`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

__all__ = ["SPLIT_REASON", "fix_split_sizes"]

SPLIT_REASON = (
    "its channels pass through a channel split or slice (chunk, split, x[:, :n]), whose parts the "
    "forward derives from the width or fixes in code: removing units would move them, so they stay whole"
)


class _SplitSizesView:
    """A split's grad_fn stand-in that also says its part sizes (TP's `_saved_split_sizes`)."""

    __slots__ = ("_fn", "_saved_split_sizes")

    def __init__(self, fn: Any, sizes: list[int]) -> None:
        self._fn = fn
        self._saved_split_sizes = sizes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def _raw(fn: Any) -> Any:
    """The autograd node behind wt's grad_fn views."""
    while (inner := getattr(fn, "_fn", None)) is not None:  # only the views have `_fn`
        fn = inner
    return fn


def _part_sizes(fn: Any) -> list[int] | None:
    """The sizes of a `chunk`/`split(int)` node's parts along its dim, from what autograd saved."""
    size, sizes, dim = (getattr(fn, a, None) for a in ("_saved_split_size", "_saved_self_sym_sizes", "_saved_dim"))
    if not isinstance(size, int) or size <= 0 or sizes is None or not isinstance(dim, int) or not 0 <= dim < len(sizes):
        return None
    total = int(sizes[dim])
    return [min(size, total - start) for start in range(0, total, size)]


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


def fix_split_sizes(module2node: Mapping[Any, Node], balanced: Collection[Node] = ()) -> set[Node]:
    """Give every `chunk`-like split node of the channel dim whose parts each feed exactly one node its part
    sizes, and order its outputs by part; other splits are left to TP (a walk that mis-maps them is then not
    trusted). Returns every split node of the channel dim and every slice that narrows it: a group through one is
    not prunable (`SPLIT_REASON`)."""
    found: set[Node] = set()
    for node in module2node.values():
        if node in balanced:  # chunks after a channel shuffle: their groups' units are balanced (`balance`)
            continue
        if node.type == tp_ops.OPTYPE.SLICE and _narrows(node):
            found.add(node)
        if node.type != tp_ops.OPTYPE.SPLIT or getattr(node.grad_fn, "_saved_dim", None) != 1:
            continue
        found.add(node)
        if hasattr(node.grad_fn, "_saved_split_sizes"):
            continue
        parts = _part_sizes(node.grad_fn)
        if parts is None or len(parts) != len(node.outputs):
            continue
        raw = _raw(node.grad_fn)
        part_of: dict[Node, int] = {}
        for out in node.outputs:
            nrs = {nr for f, nr in getattr(_raw(out.grad_fn), "next_functions", ()) if f is raw}
            if len(nrs) != 1:
                break
            part_of[out] = nrs.pop()
        else:
            if sorted(part_of.values()) == list(range(len(parts))):
                node.outputs.sort(key=part_of.__getitem__)
                node.grad_fn = _SplitSizesView(node.grad_fn, parts)
    return found
