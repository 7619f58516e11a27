"""Torch-Pruning's dependency graph, with wt's fixes: negative saved dims normalized (Torch-Pruning issue #532),
channel shuffles modelled as permutations, rotate_half marked, a pruner for Hugging Face's `Conv1D`, phases reported
to the budget; and which layers must not root a group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_im
from torch_pruning.dependency.node import Node

from ..modules import is_hf_conv1d
from .budget import Budget
from .constant import recording_constant_inputs
from .nodes import UNSIGNED_WRAP, saved_dim, saved_sizes
from .rotary import rotate_half_nodes
from .shuffle import find_channel_shuffles, model_channel_shuffles
from .splits import channel_splits

__all__ = ["DependencyGraph", "HFConv1DPruner", "chunk_sizes", "concat_index_mapping", "fused_linears",
           "normalized_dim", "release_graph"]


class _GradFnView:
    """A grad_fn stand-in whose `_saved_dim` is normalized (and, for a chunk, with `_saved_split_sizes`);
    everything else is read from the real node."""

    __slots__ = ("_fn", "_saved_dim", "_saved_split_sizes")

    def __init__(self, fn: Any, dim: int, split_sizes: Sequence[int] | None = None) -> None:
        self._fn = fn
        self._saved_dim = dim
        if split_sizes is not None:
            self._saved_split_sizes = tuple(split_sizes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


_UNKNOWN_DIM = 99  # below TP's MAX_VALID_DIM (100) and != 0/1: TP then treats the op as not touching channels


def normalized_dim(node: Node) -> int | None:
    """The non-negative dim of a cat/split/unbind/slice node whose saved dim was read as unsigned, else None."""
    fn = node.grad_fn
    dim = getattr(fn, "_saved_dim", None)
    if not isinstance(dim, int) or dim < UNSIGNED_WRAP:
        return None
    signed = dim - 2**64  # the unsigned read-back of a negative dim
    rank: int | None = None
    sizes = saved_sizes(fn)
    if sizes is not None:
        rank = len(sizes)
    else:
        try:  # private API: shapes of the op's outputs (the gradients this node receives)
            out_rank = len(fn._input_metadata[0].shape)
            rank = out_rank + 1 if node.type == tp_ops.OPTYPE.UNBIND else out_rank
        except Exception:
            rank = None
    if rank is None or not -rank <= signed < 0:
        return _UNKNOWN_DIM
    return signed + rank


def chunk_sizes(node: Node) -> list[int] | None:
    """The piece sizes of a `chunk` (or `split` by one size) node, with the node's outputs put in piece order, or
    None (left to Torch-Pruning) when not every piece feeds exactly one distinct node. Torch-Pruning reads
    `_saved_self_sizes`, which torch 2.x calls `_saved_self_sym_sizes`, so it guesses chunk sizes by shape
    inference (ShuffleNetV2: [192, 96] for a chunk of 192 channels), and it pairs the i-th output node it traced
    with the i-th piece; the piece each output reads is the output number in its grad_fn's `next_functions`."""
    fn = node.grad_fn
    real = getattr(fn, "_fn", fn)
    if not (hasattr(real, "name") and real.name().startswith("SplitBackward")):
        return None
    size, sizes = getattr(real, "_saved_split_size", None), saved_sizes(real)
    if size is None or sizes is None or int(size) <= 0:
        return None
    dim = saved_dim(getattr(fn, "_saved_dim", 0), len(sizes))
    if dim >= len(sizes):
        return None
    total, size = int(sizes[dim]), int(size)
    pieces = [min(size, total - start) for start in range(0, total, size)]
    piece_of: dict[Node, int] = {}
    for out in node.outputs:
        nrs = {nr for f, nr in getattr(out.grad_fn, "next_functions", ()) if f is real}
        if len(nrs) != 1:
            return None
        piece_of[out] = nrs.pop()
    if sorted(piece_of.values()) != list(range(len(pieces))):
        return None
    node.outputs.sort(key=piece_of.__getitem__)
    return pieces


def concat_index_mapping(node: Node) -> None:
    """Torch-Pruning's concat index mappings for a channel concat, from the sizes autograd recorded for its inputs.
    Torch-Pruning infers the sizes by shape inference and skips the concat when the inferred output width
    disagrees (across a channel shuffle it can), which leaves every input mapped to the first channels."""
    fn = node.grad_fn
    real = getattr(fn, "_fn", fn)
    nexts = [(f, nr) for f, nr in getattr(real, "next_functions", ()) if f is not None]
    try:
        rank = len(nexts[0][0]._input_metadata[nexts[0][1]].shape)
        if saved_dim(getattr(fn, "_saved_dim", -1), rank) != 1 or not node.enable_index_mapping:
            return
        sizes = [int(f._input_metadata[nr].shape[1]) for f, nr in nexts]
    except Exception:  # private autograd metadata: leave the concat to Torch-Pruning
        return
    fns = [getattr(i.grad_fn, "_fn", i.grad_fn) for i in node.inputs]
    if len(fns) != len(nexts) or any(g is not f for g, (f, _) in zip(fns, nexts)):
        return  # inputs not one node per concatenated tensor, in order
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    node.module.concat_sizes, node.module.offsets = sizes, offsets
    for i, inp in enumerate(node.inputs):
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping[1] = tp_im._ConcatIndexMapping(offset=offsets[i: i + 2], reverse=True)
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping[1] = tp_im._ConcatIndexMapping(offset=offsets[i: i + 2], reverse=False)


class DependencyGraph(tp.DependencyGraph):
    """TP's graph, reporting its phase to the budget and normalizing negative saved dims right after the
    forward trace (before TP derives concat/split index mappings from them)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self._budget = budget
        self.shuffles: list[tuple[list[Node], int, int]] = []
        self.rotary: set[Node] = set()
        self.splits: set[Node] = set()
        self.constant_inputs: set[nn.Module] = set()  # layers reading neither a parameter nor a model input

    def build_dependency(self, model: nn.Module, *args: Any, **kwargs: Any) -> DependencyGraph:
        """TP's, with a pruner for Hugging Face's `Conv1D` (GPT-2). Without one TP treats its weight and bias
        as unwrapped parameters and prunes their *last* axis, so the hidden dimension would be coupled to
        columns of `c_attn.weight` (its out features) instead of its rows."""
        for t in {type(m) for m in model.modules() if is_hf_conv1d(m)}:
            self.register_customized_layer(t, HFConv1DPruner())
        super().build_dependency(model, *args, **kwargs)
        for node in {i for chain, _, _ in self.shuffles for i in chain[0].inputs}:
            if node.type == tp_ops.OPTYPE.CONCAT and node.module.offsets is None:
                concat_index_mapping(node)
        model_channel_shuffles(self.shuffles)
        return self

    def _trace(self, model: nn.Module, example_inputs: Any, forward_fn: Any, output_transform: Any) -> dict:
        self._budget.phase = "running the example forward pass and reading its autograd graph"
        with recording_constant_inputs(model, example_inputs, self.constant_inputs):
            module2node = super()._trace(model, example_inputs, forward_fn, output_transform)
        for node in module2node.values():
            if node.type in (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.SLICE):
                dim = normalized_dim(node)
                if dim is not None:
                    node.grad_fn = _GradFnView(node.grad_fn, dim)
                    if isinstance(node.module, tp_ops._SliceOp):
                        node.module.dim = dim
        self.shuffles = find_channel_shuffles(module2node)
        balanced = {o for chain, _, _ in self.shuffles for o in chain[-1].outputs}  # ShuffleNet's chunks
        self.splits = channel_splits(module2node, balanced)  # the other channel splits: not prunable
        for node in balanced | self.splits:
            pieces = chunk_sizes(node) if node.type == tp_ops.OPTYPE.SPLIT else None
            if pieces is not None:
                fn = node.grad_fn
                real = getattr(fn, "_fn", fn)
                node.grad_fn = _GradFnView(real, saved_dim(fn._saved_dim, len(saved_sizes(real))), pieces)
        self.rotary = rotate_half_nodes(module2node)
        self._budget.phase = "building dependencies and index mappings (Torch-Pruning)"
        return module2node


class HFConv1DPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruning functions for Hugging Face's `Conv1D`: `y = x @ weight + bias`, weight [in, out]."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.nf = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if getattr(layer, "bias", None) is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.nf)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[0])


def fused_linears(dg: DependencyGraph) -> list[nn.Module]:
    """Linear (and HF Conv1D) layers whose output features are split or sliced into parts (GPT-2's fused
    `c_attn`, Phi-3's `gate_up_proj` and `qkv_proj`): they root no group. TP splits only along dim 1, so
    every part of the output would be coupled to the first part's consumers; and a unit of such a layer is
    one feature of each part (a row of the gate and of the up projection; a head's q, k and v rows), which
    TP cannot express."""
    out = []
    for m, n in dg.module2node.items():
        if not (isinstance(m, nn.Linear) or is_hf_conv1d(m)):
            continue
        slices = 0
        for o in n.outputs:
            if o in dg.rotary:  # rotate_half's own halves: the features are permuted, not fused
                continue
            sizes = saved_sizes(o.grad_fn)
            dim = getattr(o.grad_fn, "_saved_dim", None)
            if not (sizes and isinstance(dim, int) and saved_dim(dim, len(sizes)) == len(sizes) - 1):
                continue  # not along the feature dim
            if o.type == tp_ops.OPTYPE.SPLIT and saved_dim(dim, len(sizes)) != 1:
                slices += 2
            elif o.type == tp_ops.OPTYPE.SLICE:  # qkv[..., :q], qkv[..., q:q + kv], ...
                slices += 1
        if slices >= 2:
            out.append(m)
    return out


def release_graph(dg: tp.DependencyGraph) -> None:
    """Break the reference cycles of TP's graph (node <-> node, node <-> dependency) once the structure is
    built, so reference counting frees it at once instead of leaving it to the cyclic collector."""
    for node in dg.module2node.values():
        node.inputs.clear()
        node.outputs.clear()
        node.dependencies.clear()
    dg.module2node.clear()

