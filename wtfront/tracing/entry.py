"""Lower an `nn.Module` to the wt IR through Torch-Pruning's dependency graph.

Torch-Pruning (TP) records the example forward pass, couples every pair of layers whose channels must be
pruned together, and yields one *group* per root layer (a conv, a linear, ...). Each group item names a
layer, whether its out- or in-channels are cut (the pruning function), the layer-local channel indices
and, for each, the root channel it belongs to. `trace` turns every group into one `UnitGroup`: a unit
per root channel, and per parameter axis a `Slice` whose `index[i]` is the unit of entry `i`.

Guards: inputs on the wrong device, a wall-clock budget that interrupts TP's known infinite loops, bounded
group walks (`tpgroups.WalkLimits`: a diverging index mapping raises instead of exhausting memory), a fix
for TP reading `torch.cat(dim=-1)` as dim 2**64-1 (TP issue #532), and errors naming the module for any
layer whose parameters cannot be mapped to units. Groups whose coupling TP gets wrong without failing are
marked not prunable with the reason: units that are not closed (grouped-query attention) and rotary
embeddings' rotate_half. Hugging Face's `Conv1D` (GPT-2) gets a TP pruner (weight [in, out]).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops as tp_ops
from torch_pruning.dependency.node import Node

from wtcore.errors import TraceError
from wtcore.ir import Param, Slice, Structure, UnitGroup, runs_from_list

from .budget import Budget, BudgetExceeded
from .filters import DEFAULT_ROOT_TYPES, IgnoreSpec, resolve_ignored
from .slicers import CONV1D_PARAMS, KNOWN_PARAMS, RawSlice, UnloweredModule, is_hf_conv1d, lower_item, rule_type
from .tpgroups import NO_ROOT, WalkDiverged, WalkLimits, all_groups

__all__ = ["DEFAULT_ROOT_TYPES", "OUTPUT_REASON", "ROTARY_REASON", "SHUFFLE_REASON", "trace"]

OUTPUT_REASON = "feeds the model output"

# TP's placeholder nodes for non-parametric ops: they carry no parameters and are skipped when lowering.
_TP_DUMMY = (
    tp_ops._ConcatOp,
    tp_ops._SplitOp,
    tp_ops._ElementWiseOp,
    tp_ops._ReshapeOp,
    tp_ops._UnbindOp,
    tp_ops._ExpandOp,
    tp_ops._SliceOp,
    tp_ops._OutputOp,
)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignore: Iterable[IgnoreSpec] | IgnoreSpec = (),
    root_types: Sequence[type[nn.Module]] | None = None,
    budget_s: float = 120.0,
    check_device: bool = True,
    costs: bool = True,
    units: Iterable[str] | None = None,
    heads: Mapping[str, Any] | None = None,
) -> Structure:
    """Trace `model` on `example_inputs` and return its `Structure` (unit groups and parameter slices; no ops).

    Args:
        model: the model; it runs once in eval mode with autograd on (TP reads the autograd graph), and its
            training flags, `requires_grad` flags and hooks are restored afterwards.
        example_inputs: a tensor (the single positional argument), a tuple/list (positional arguments) or a
            mapping (keyword arguments).
        ignore: module instances, nn.Module classes or fnmatch globs over qualified module names; submodules
            of an ignored module are ignored too. As in TP's MetaPruner, ignored modules are passed to
            `get_all_groups` (not to `build_dependency`, which would trace them as element-wise ops and
            silently corrupt the coupling): they root no group, and a group that would cut an ignored module's
            out-channels is dropped. Where an ignored module's *inputs* are coupled to a kept group, its
            in-channel slices stay in that group (pruning the group does change it); an ignored module whose
            parameters cannot be mapped to units is left out of every group instead of raising.
            Parameters in no group are listed in `Structure.uncoupled`.
        root_types: module types whose out-channels root a group; default `DEFAULT_ROOT_TYPES` (convs incl.
            transposed, Linear, MultiheadAttention, LayerNorm, Embedding; plus Hugging Face's Conv1D when the
            model has one).
        budget_s: wall-clock limit; past it a `TraceError` names the phase that did not finish.
        check_device: raise a `TraceError` if input tensors and parameters are on different devices.
        costs: count baseline MACs per costed op (`wtfront.costs.add_costs`).
        units: unit kinds of transformers that are prunable (`wtfront.attention`): "head", "kv_head",
            "mlp_feature", "hidden"; default `DEFAULT_UNITS` (heads, KV heads under grouped-query attention,
            MLP features). Attention heads are discovered from the modules and replace Torch-Pruning's
            row-level groups of q/k/v and the output projection; kinds not selected stay in the IR, not
            prunable. Models without attention are unaffected.
        heads: overrides of the discovered heads by qualified module name: `N` query heads, `(N, N_kv)`, or
            None to leave that module to Torch-Pruning's row-level groups.

    One `UnitGroup` per TP group, rooted at the group's earliest module (in `model.named_modules()` order)
    of a root type whose out-channels map one-to-one to the units, so unit `i` is that module's channel `i`
    (a ViT's hidden dimension is rooted at the patch embedding, not at the last MLP where TP starts). Groups
    are ordered by their root's position in `model.named_modules()`, named `"<root>.out"`, of kind "channel"
    for conv roots and "feature" otherwise. A group is not prunable, with a `reason`, when its channels reach
    a model output through parameter-free ops only (`OUTPUT_REASON`), or pass through a channel shuffle
    (`SHUFFLE_REASON`, ShuffleNet). Parameters are named canonically by tensor identity (first name from
    `named_parameters(remove_duplicate=False)`; later names are aliases), so a tied weight appears once and
    its slices from both modules are merged per axis. With `costs=True` (default) `Structure.ops` holds the
    cost ops of `wtfront.costs` (one more forward pass); with `costs=False` it is empty.

    Raises:
        TraceError: inputs on another device, the budget spent, TP or the forward pass failing (with the
            phase), or a module coupled to a group whose parameters cannot be mapped to units (with its name
            and the advice to pass it in `ignore=`).
    """
    inputs = _normalize_inputs(example_inputs)
    if check_device:
        _check_devices(model, inputs)
    ignored = resolve_ignored(model, ignore)
    roots = tuple(root_types) if root_types is not None else DEFAULT_ROOT_TYPES
    if root_types is None:  # Hugging Face's Conv1D is GPT-2's linear layer: it roots its out features too
        roots += tuple({type(m) for m in model.modules() if is_hf_conv1d(m)})
    budget = Budget(budget_s)
    model_name = type(model).__name__
    try:
        with _gc_paused(), _tracing_state(model), budget.guard():
            budget.phase = "starting Torch-Pruning"
            dg = _DependencyGraph(budget)
            dg.build_dependency(model, example_inputs=inputs, forward_fn=_forward, verbose=False)
            budget.phase = "collecting pruning groups"
            try:
                tp_groups = list(all_groups(dg, [*ignored, *_fused_linears(dg)], roots, WalkLimits.for_model(model),
                                             refresh_index_mapping=False))  # build_dependency just did
            except WalkDiverged as e:
                raise _diverged_error(model, dg, e) from None
            budget.phase = "lowering pruning groups to the IR"
            structure = _Lowering(model, dg, ignored, roots).run(tp_groups, model_name)
            budget.phase = "discovering attention heads"
            from .attention import DEFAULT_UNITS, apply_attention_costs, apply_attention_units

            units = tuple(DEFAULT_UNITS if units is None else units)
            structure, layouts = apply_attention_units(structure, model, units, heads)
            _release_graph(dg)
        if costs:  # one more forward pass (fvcore's jit trace), outside TP's hooks: cost ops and baseline MACs
            from .costs import add_costs

            budget.phase = "counting MACs (fvcore)"
            structure = add_costs(structure, model, inputs)
            structure = apply_attention_costs(structure, layouts, units)
        return structure
    except BudgetExceeded:
        raise TraceError(
            f"tracing {model_name} did not finish within budget_s={budget_s:g} s: gave up after "
            f"{budget.elapsed:.1f} s while {budget.phase}. Torch-Pruning can loop forever on some graphs "
            "(e.g. torch.cat(dim=-1) in rotary-embedding blocks, Torch-Pruning issue #532); raise budget_s if "
            "the model is merely large, or pass the offending modules in ignore="
        ) from None
    except TraceError:
        raise
    except Exception as e:  # TP or the model's forward failed: say where, keep the cause
        raise TraceError(
            f"tracing {model_name} failed while {budget.phase}: {type(e).__name__}: {e}"
        ) from e


def _fused_linears(dg: _DependencyGraph) -> list[nn.Module]:
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
            sizes = getattr(o.grad_fn, "_saved_self_sym_sizes", None) or getattr(o.grad_fn, "_saved_self_sizes", None)
            dim = getattr(o.grad_fn, "_saved_dim", None)
            if not (sizes and isinstance(dim, int) and _dim(dim, len(sizes)) == len(sizes) - 1):
                continue  # not along the feature dim
            if o.type == tp_ops.OPTYPE.SPLIT and _dim(dim, len(sizes)) != 1:
                slices += 2
            elif o.type == tp_ops.OPTYPE.SLICE:  # qkv[..., :q], qkv[..., q:q + kv], ...
                slices += 1
        if slices >= 2:
            out.append(m)
    return out


def _diverged_error(model: nn.Module, dg: _DependencyGraph, e: WalkDiverged) -> TraceError:
    """A TraceError naming the group being walked and the modules/parameters nearest to where TP's index
    mappings diverged (the node itself is usually a parameter-free reshape or expand)."""
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    near = _nearest_named(e.node, names)
    root = names.get(id(e.root), type(e.root).__name__)
    where = f" next to {', '.join(repr(n) for n in near)}" if near else ""
    return TraceError(
        f"tracing {type(model).__name__}: Torch-Pruning's channel index mappings diverge while collecting the group "
        f"of {root!r} ({type(e.root).__name__}): the {e.what} reached {e.value:,} (more than any layer of the model "
        f"can have, limit {e.limit:,}) at {e.node.name}{where}. Torch-Pruning mis-reads a reshape/expand there "
        "(e.g. the window partition and relative-position bias of Swin Transformers); the walk would not end before "
        "memory runs out. wt cannot trace this model's channels; ignore= does not help, since the mis-read ops stay "
        "in the graph"
    )


def _nearest_named(node: Node, names: Mapping[int, str], limit: int = 3) -> list[str]:
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


# ----------------------------------------------------------------------------------------------- inputs
def _normalize_inputs(example_inputs: Any) -> tuple[Any, ...] | dict[str, Any]:
    """A tensor or any other single object becomes the one positional argument, a list/tuple the positional
    arguments, a mapping (e.g. HF BatchEncoding) the keyword arguments."""
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def _forward(model: nn.Module, inputs: tuple[Any, ...] | dict[str, Any]) -> list[torch.Tensor]:
    """Our own call instead of TP's, which tries `model(*inputs)` and on *any* error retries `model(inputs)`,
    hiding the real error (and swallowing a budget interrupt). Returns the output tensors that autograd
    connects to the model: TP's own flattening fails on `None` entries (e.g. `(logits, None)`), and a
    tensor without grad_fn would become a spurious output node."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    leaves = [t for t in _tensors(out) if t.grad_fn is not None]
    if not leaves:
        raise TraceError(
            f"no output of {type(model).__name__} depends on its parameters through autograd "
            "(outputs detached, computed under no_grad inside forward, or not tensors), so nothing can be traced"
        )
    return leaves


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors of a nested structure of tuples, lists and mappings (HF ModelOutput is one), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _check_devices(model: nn.Module, inputs: Any) -> None:
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:  # no parameters, or a model split over devices: nothing to compare against
        return
    (dev,) = devices
    for t in _tensors(inputs):
        if t.device != dev:
            raise TraceError(
                f"example inputs are on device {t.device} but the model's parameters are on {dev}; "
                f"move the inputs with .to({str(dev)!r}) (or pass check_device=False)"
            )


# ------------------------------------------------------------------------------------ garbage collection
@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while tracing. TP's graph (nodes, dependencies, op modules: ~3,200 objects
    on ResNet-50) is alive, and cyclic, during the whole trace, so every collection the trace's allocations
    trigger (8 young ones per ResNet-50 trace) walks it and promotes it to the oldest generation, where it
    stays as garbage until a full collection walks the whole heap: one every ~10 traces, 0.25 s there with
    the torch/torchvision heap (~400k objects). Paused, it is never promoted, and `_release_graph` frees it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _release_graph(dg: tp.DependencyGraph) -> None:
    """Break the reference cycles of TP's graph (node <-> node, node <-> dependency) once the structure is
    built, so reference counting frees it at once instead of leaving it to the cyclic collector."""
    for node in dg.module2node.values():
        node.inputs.clear()
        node.outputs.clear()
        node.dependencies.clear()
    dg.module2node.clear()


# ------------------------------------------------------------------------------------ model state guard
@contextmanager
def _tracing_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, autograd on and every floating parameter requiring grad (TP follows grad_fn edges, so a
    frozen layer would vanish from the graph); restore flags and drop TP's hooks even if tracing is
    interrupted mid-forward."""
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    frozen = [p for p in model.parameters() if not p.requires_grad and (p.is_floating_point() or p.is_complex())]
    hooks_before = [set(m._forward_hooks) for m in modules]
    inference_off = torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()
    try:
        with inference_off, torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            model.eval()
            yield
    finally:
        for m, before in zip(modules, hooks_before):
            if not m._forward_hooks:
                continue  # nothing left to remove (TP removes its hooks when its forward ends)
            for k in [k for k in m._forward_hooks if k not in before]:
                if "_record_grad_fn" in getattr(m._forward_hooks[k], "__qualname__", ""):
                    del m._forward_hooks[k]
        for p in frozen:
            p.requires_grad_(False)
        for m, flag in training:
            if m.training != flag:  # nn.Module.__setattr__ is slow: only where eval() changed it
                m.training = flag


# ------------------------------------------------------------------------------ TP graph with fixes
class _GradFnView:
    """A grad_fn stand-in whose `_saved_dim` is normalized; everything else is read from the real node."""

    __slots__ = ("_fn", "_saved_dim")

    def __init__(self, fn: Any, dim: int) -> None:
        self._fn = fn
        self._saved_dim = dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


_UNSIGNED_WRAP = 2**63
_UNKNOWN_DIM = 99  # below TP's MAX_VALID_DIM (100) and != 0/1: TP then treats the op as not touching channels


def _normalized_dim(node: Node) -> int | None:
    """The non-negative dim of a cat/split/unbind/slice node whose saved dim was read as unsigned, else None."""
    fn = node.grad_fn
    dim = getattr(fn, "_saved_dim", None)
    if not isinstance(dim, int) or dim < _UNSIGNED_WRAP:
        return None
    signed = dim - 2**64  # the unsigned read-back of a negative dim
    rank: int | None = None
    sizes = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
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


class _DependencyGraph(tp.DependencyGraph):
    """TP's graph, reporting its phase to the budget and normalizing negative saved dims right after the
    forward trace (before TP derives concat/split index mappings from them)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self._budget = budget
        self.barriers: set[Node] = set()
        self.rotary: set[Node] = set()

    def build_dependency(self, model: nn.Module, *args: Any, **kwargs: Any) -> _DependencyGraph:
        """TP's, with a pruner for Hugging Face's `Conv1D` (GPT-2). Without one TP treats its weight and bias
        as unwrapped parameters and prunes their *last* axis, so the hidden dimension would be coupled to
        columns of `c_attn.weight` (its out features) instead of its rows."""
        for t in {type(m) for m in model.modules() if is_hf_conv1d(m)}:
            self.register_customized_layer(t, _HFConv1DPruner())
        return super().build_dependency(model, *args, **kwargs)

    def _trace(self, model: nn.Module, example_inputs: Any, forward_fn: Any, output_transform: Any) -> dict:
        self._budget.phase = "running the example forward pass and reading its autograd graph"
        module2node = super()._trace(model, example_inputs, forward_fn, output_transform)
        for node in module2node.values():
            if node.type in (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.SLICE):
                dim = _normalized_dim(node)
                if dim is not None:
                    node.grad_fn = _GradFnView(node.grad_fn, dim)
                    if isinstance(node.module, tp_ops._SliceOp):
                        node.module.dim = dim
        self.barriers = _cut_channel_shuffles(module2node)
        self.rotary = _rotate_half_nodes(module2node)
        self._budget.phase = "building dependencies and index mappings (Torch-Pruning)"
        return module2node


class _HFConv1DPruner(tp.pruner.function.BasePruningFunc):
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


ROTARY_REASON = ("its channels pass through a rotary position embedding, whose rotate_half pairs entry d of each "
                 "head with entry d + head_dim/2, which Torch-Pruning couples as if element-wise; prune attention "
                 "heads instead")


def _rotate_half_nodes(module2node: dict) -> set[Node]:
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


SHUFFLE_REASON = "its channels pass through a channel shuffle (view-transpose-view), which wt does not model"


def _shapes(node: Node) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(input shape, output shape) of a reshape node, from its saved sizes and autograd metadata."""
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
    try:
        out = tuple(int(d) for d in fn._input_metadata[0].shape)
    except Exception:
        return None
    return (tuple(int(d) for d in sizes), out) if sizes is not None else None


def _dim(d: Any, rank: int) -> int:
    """A saved autograd dim as a non-negative int (negative dims may be read back as unsigned)."""
    d = int(d)
    if d >= _UNSIGNED_WRAP:
        d -= 2**64
    return d + rank if d < 0 else d


def _swaps_split_dims(node: Node) -> bool:
    """A transpose/permute of a 5-D tensor that swaps dims 1 and 2 (the two halves of a split channel dim)."""
    fn = node.grad_fn
    name = fn.name() if hasattr(fn, "name") else ""
    if name.startswith("TransposeBackward"):
        return {_dim(getattr(fn, "_saved_dim0", 0), 5), _dim(getattr(fn, "_saved_dim1", 0), 5)} == {1, 2}
    if name.startswith("PermuteBackward"):
        perm = [_dim(d, 5) for d in getattr(fn, "_saved_dims", ())]
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
        elif isinstance(cur.module, _TP_DUMMY):
            swapped = swapped or _swaps_split_dims(cur)
        else:
            return None
        if len(cur.outputs) != 1:
            return None
        cur = cur.outputs[0]
    return None


def _cut_channel_shuffles(module2node: dict) -> set[Node]:
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


# ------------------------------------------------------------------------------ groups that are not closed
def _unrooted_reason(modules: Sequence[str]) -> str:
    shown = ", ".join(repr(m) for m in modules[:3]) + (f" (+{len(modules) - 3})" if len(modules) > 3 else "")
    return (f"Torch-Pruning could not map channels coupled through {shown} to the group's units (e.g. repeat_kv "
            "of grouped-query attention), so its units are not closed")


def _mark_partial_coverage(groups: list[UnitGroup], shapes: Mapping[str, tuple[int, ...]]) -> list[UnitGroup]:
    """Groups made not prunable where Torch-Pruning coupled only part of a parameter axis.

    Every axis a group touches must be covered entirely by the union of all groups' slices: Torch-Pruning
    marks a module visited once any group reaches its out-channels, so channels a group leaves out of a
    module it reaches never get a group of their own. That happens when it couples tensors of different
    widths element-wise (e.g. `scaled_dot_product_attention(..., enable_gqa=True)` with 8 query and 2 KV
    heads couples the first 16 of 64 query features with the 16 key features); such a group's units are not
    what pruning them would remove.
    """
    covered: dict[tuple[str, int, int], np.ndarray] = {}  # (param, axis, conv groups of the layout)
    full: set[tuple[str, int, int]] = set()  # axes one slice covers alone (the usual case: nothing to add up)
    for g in groups:
        for sl in g.slices:
            key = (sl.param, sl.axis, sl.groups)
            if key in full:
                continue
            if all(r.start >= 0 for r in sl.index):
                full.add(key)
                continue
            length = shapes[sl.param][sl.axis] * sl.groups
            cov = covered.setdefault(key, np.zeros(length, dtype=bool))
            cov |= _materialize(sl.index, length) >= 0
    partial = {k: (int(c.sum()), c.size) for k, c in covered.items() if k not in full and not c.all()}
    if not partial:
        return groups
    out = []
    for g in groups:
        hits = [k for k in ((sl.param, sl.axis, sl.groups) for sl in g.slices) if k in partial]
        if hits:
            (p, ax, _), (have, n) = hits[0], partial[hits[0]]
            why = (f"Torch-Pruning coupled only {have} of the {n} entries of {p!r} axis {ax} to units (it couples "
                   "tensors of different widths element-wise, e.g. grouped-query attention), so its units are not "
                   "closed")
            g = dataclasses.replace(g, prunable=False, reason="; ".join(r for r in (g.reason, why) if r))
        out.append(g)
    return out


def _materialize(runs: Sequence[Any], length: int) -> np.ndarray:
    """The unit of each entry of a run-encoded slice index (-1: none)."""
    parts = [np.full(r.length, -1, dtype=np.int64) if r.start < 0 else
             r.start + (np.arange(r.length) // r.repeat) * r.step for r in runs]
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if idx.size != length:
        raise TraceError(f"internal: a slice index of {idx.size} entries on an axis of {length}")
    return idx


# ----------------------------------------------------------------------------------------- lowering
@dataclass
class _Acc:
    """Index entries of one (param, axis) in one group, merged over every item that touches it."""

    length: int
    groups: int
    group_axis: int
    index: np.ndarray


class _Lowering:
    """Turns TP groups into UnitGroups; holds the canonical parameter naming of the model."""

    def __init__(
        self, model: nn.Module, dg: _DependencyGraph, ignored: Sequence[nn.Module], root_types: tuple[type, ...]
    ) -> None:
        self.model = model
        self.root_types = root_types
        self.dg = dg
        self.ignored = {id(m) for m in ignored}
        self.module_names: dict[int, str] = {}
        self.module_order: dict[int, int] = {}
        self.modules_by_name: dict[str, nn.Module] = {}
        for i, (name, m) in enumerate(model.named_modules()):
            self.module_names.setdefault(id(m), name)
            self.module_order.setdefault(id(m), i)
            self.modules_by_name[name] = m
        # canonical names by tensor identity: the first name wins, later names are aliases
        self.canonical: dict[int, str] = {}
        self.by_name: dict[str, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canon = self.canonical.setdefault(id(p), name)
            self.by_name[name] = canon
            if canon == name:
                self.tensors[name] = p
                aliases[name] = []
            elif name not in aliases[canon]:
                aliases[canon].append(name)
        self.aliases = aliases
        self.param_order = {n: i for i, n in enumerate(self.tensors)}
        self.outputs = self._output_reaching_nodes()
        self.lowered_modules: dict[int, nn.Module] = {}
        self.names_by_id = {**self.module_names, **self.canonical}

    # -- names -----------------------------------------------------------------------------------
    def module_name(self, m: Any) -> str:
        if isinstance(m, torch.Tensor):
            return self.canonical.get(id(m), "<unwrapped parameter>")
        name = self.module_names.get(id(m))
        return name if name is not None else str(m)

    def param_name(self, s: RawSlice, item_name: str) -> str:
        """Canonical name of the parameter a raw slice refers to (through aliases, nn.utils.prune's `_orig`
        and parametrize's `.original`)."""
        if s.owner is None:
            canon = self.canonical.get(id(s.tensor))
            if canon is None:
                raise TraceError(f"Torch-Pruning coupled a tensor of shape {tuple(s.tensor.shape)} that is not a "
                                 "parameter of the model")
            return canon
        qual = f"{item_name}.{s.attr}" if item_name else s.attr
        prefix, _, leaf = qual.rpartition(".")
        dot = f"{prefix}." if prefix else ""
        for candidate in (qual, f"{qual}_orig", f"{dot}parametrizations.{leaf}.original"):
            canon = self.by_name.get(candidate)
            if canon is not None:
                if tuple(self.tensors[canon].shape) != tuple(s.tensor.shape):
                    break
                return canon
        raise UnloweredModule(
            f"parameter {qual!r} of {item_name!r} could not be matched to a parameter of the model with the same "
            "shape (a parametrization that changes its shape?); pass the module in ignore="
        )

    def is_ignored(self, target: Any) -> bool:
        """An ignored module, or an unwrapped parameter owned by one."""
        if isinstance(target, torch.Tensor):
            owner = self.canonical.get(id(target), "").rpartition(".")[0]
            try:
                return id(self.model.get_submodule(owner)) in self.ignored
            except AttributeError:
                return False
        return id(target) in self.ignored

    # -- outputs ---------------------------------------------------------------------------------
    def _output_reaching_nodes(self) -> set[Node]:
        """Nodes whose output reaches a model output through parameter-free ops only (TP's graph is built
        backwards from the outputs, so the nodes without outputs are exactly the model outputs)."""
        reach: set[Node] = set()
        stack = [n for n in self.dg.module2node.values() if not n.outputs and n not in self.dg.barriers]
        while stack:
            n = stack.pop()
            if n in reach:
                continue
            reach.add(n)
            if isinstance(n.module, _TP_DUMMY):
                stack.extend(n.inputs)
        return reach

    # -- groups ----------------------------------------------------------------------------------
    def run(self, tp_groups: Sequence[Any], model_name: str) -> Structure:
        entries = [self.lower_group(g) for g in tp_groups]
        entries.sort(key=lambda e: e[0])
        groups: list[UnitGroup] = []
        used: set[str] = set()
        for _, ug in entries:
            name, k = ug.name, 2
            while name in used:
                name, k = f"{ug.name}#{k}", k + 1
            used.add(name)
            if name != ug.name:
                ug = UnitGroup(name, ug.kind, ug.size, ug.slices, ug.prunable, ug.root, ug.baseline_size, ug.reason)
            groups.append(ug)
        self.check_unknown_params()
        groups = _mark_partial_coverage(groups, {n: tuple(t.shape) for n, t in self.tensors.items()})
        touched = {s.param for g in groups for s in g.slices}
        params = tuple(self.make_param(n) for n in self.tensors)
        uncoupled = tuple(sorted(n for n in self.tensors if n not in touched))
        return Structure(params, tuple(groups), (), model_name, uncoupled)

    def make_param(self, name: str) -> Param:
        t = self.tensors[name]
        owner = name.rpartition(".")[0]
        mod = self.modules_by_name.get(owner) or self.model.get_submodule(owner)
        return Param(
            name=name,
            shape=tuple(int(d) for d in t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            module=owner,
            module_type=type(mod).__name__,
            aliases=tuple(self.aliases[name]),
        )

    def lower_group(self, group: Any) -> tuple[int, UnitGroup]:
        """One TP group as a UnitGroup, with its root's position in `named_modules()` (the sort key)."""
        dg = self.dg
        root, relabel = self.choose_root(group)
        root_name = self.module_name(root)
        size = len(group[0].idxs)
        accs: dict[tuple[str, int], _Acc] = {}
        feeds_output = shuffled = rotary = False
        unrooted: list[str] = []
        for node in getattr(group, "cut_at", ()):  # couplings a mapping dropped: name the modules next to them
            unrooted.extend(n for n in _nearest_named(node, self.names_by_id) if n not in unrooted)
        for item in group:
            node: Node = item.dep.target
            target = node.module
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            if node in self.outputs and (out or isinstance(target, _TP_DUMMY)):
                feeds_output = True
            shuffled = shuffled or node in dg.barriers
            rotary = rotary or node in dg.rotary
            if isinstance(target, _TP_DUMMY):
                continue
            name = self.module_name(target)
            units = item.root_idxs
            local = item.idxs
            if units.size and units.min() == NO_ROOT:  # e.g. repeat_kv of grouped-query attention: keep
                lost = units == NO_ROOT  # what maps, mark the group (NO_ROOT is below every unit)
                if name not in unrooted:
                    unrooted.append(name)
                local, units = local[~lost], units[~lost]
                if not units.size:
                    continue
            pairs = (local, relabel[units])
            try:
                raws = lower_item(target, name, out=out, pairs=pairs, pruning_dim=node.pruning_dim)
                keyed = [(self.param_name(s, name), s) for s in raws]
            except UnloweredModule:
                if self.is_ignored(target):
                    continue
                raise
            if isinstance(target, nn.Module):
                self.lowered_modules[id(target)] = target
            for pname, s in keyed:
                self.merge(accs, pname, s, root_name)
        slices = [
            Slice(p, axis, runs_from_list(a.index), a.groups, a.group_axis)
            for (p, axis), a in sorted(accs.items(), key=lambda kv: (self.param_order[kv[0][0]], kv[0][1]))
        ]
        order = self.module_order.get(id(root), len(self.module_order))
        return order, UnitGroup(
            name=f"{root_name}.out" if root_name else "out",
            kind="channel" if isinstance(root, nn.modules.conv._ConvNd) else "feature",
            size=size,
            slices=tuple(slices),
            prunable=not (feeds_output or shuffled or unrooted or rotary),
            root=root_name,
            reason="; ".join(r for r, on in ((OUTPUT_REASON, feeds_output), (SHUFFLE_REASON, shuffled),
                                             (ROTARY_REASON, rotary), (_unrooted_reason(unrooted), unrooted)) if on),
        )

    def choose_root(self, group: Any) -> tuple[Any, np.ndarray]:
        """Root the group at its earliest module (in `named_modules` order) whose out-channels are pruned
        one-to-one with the units and whose type is a root type, and relabel units as that module's channels.

        TP roots a group at the first layer it meets walking back from the outputs (a ViT's hidden dimension
        at the last MLP); naming it after the layer that creates the dimension (the patch embedding) reads
        better and does not depend on TP's traversal order. Returns (root, relabel) with relabel[tp_unit].
        """
        tp_root = group[0].dep.target.module
        size = len(group[0].idxs)
        best: tuple[int, Any, np.ndarray] | None = None
        for item in group:
            m = item.dep.target.module
            if (
                not isinstance(m, self.root_types)
                or id(m) in self.ignored
                or not self.dg.is_out_channel_pruning_fn(item.dep.handler)
                or len(item.idxs) != size
            ):
                continue
            local, unit = item.idxs, item.root_idxs
            # one-to-one: every unit once, every local channel in range and once
            if not size or unit.min() < 0 or local.min() < 0 or local.max() >= size:
                continue
            if np.bincount(unit, minlength=size).max() > 1 or np.bincount(local, minlength=size).max() > 1:
                continue
            order = self.module_order.get(id(m), len(self.module_order))
            if best is None or order < best[0]:
                relabel = np.empty(size, dtype=np.int64)
                relabel[unit] = local
                best = (order, m, relabel)
        if best is None:
            return tp_root, np.arange(size, dtype=np.int64)
        return best[1], best[2]

    @staticmethod
    def merge(accs: dict[tuple[str, int], _Acc], pname: str, s: RawSlice, root_name: str) -> None:
        key = (pname, s.axis)
        acc = accs.get(key)
        pos = s.positions
        if acc is None:
            acc = accs[key] = _Acc(s.length, s.groups, s.group_axis, np.full(s.length, -1, dtype=np.int64))
            if pos.size < 2 or (pos[1:] > pos[:-1]).all():  # first item on this axis, no position twice
                acc.index[pos] = s.units
                return
        elif (acc.length, acc.groups, acc.group_axis) != (s.length, s.groups, s.group_axis):
            raise TraceError(
                f"group of {root_name!r}: {pname!r} axis {s.axis} is reached twice with different layouts "
                f"({acc.length}/{acc.groups} vs {s.length}/{s.groups} entries/groups)"
            )
        have = acc.index[pos]
        clash = (have != -1) & (have != s.units)
        if not clash.any():
            if pos.size < 2 or (pos[1:] > pos[:-1]).all():  # increasing (the usual order): no position twice
                acc.index[pos] = s.units
                return
            # the same position listed twice within one item with two units is a clash too
            order = np.argsort(s.positions, kind="stable")
            pos, units = s.positions[order], s.units[order]
            dup = (pos[1:] == pos[:-1]) & (units[1:] != units[:-1])
            if dup.any():
                k = int(np.flatnonzero(dup)[0])
                clash_pos, have_u, new_u = int(pos[k]), int(units[k]), int(units[k + 1])
            else:
                acc.index[s.positions] = s.units
                return
        else:
            k = int(np.flatnonzero(clash)[0])
            clash_pos, have_u, new_u = int(s.positions[k]), int(have[k]), int(s.units[k])
        raise TraceError(
            f"group of {root_name!r}: entry {clash_pos} of {pname!r} axis {s.axis} is coupled to two different "
            f"units ({have_u} and {new_u}); this structure is not supported, pass the module in ignore="
        )

    def check_unknown_params(self) -> None:
        """A module in a group with parameters its TP pruner never touches would be broken by pruning."""
        for m in self.lowered_modules.values():
            if id(m) in self.ignored:
                continue
            t = rule_type(m)
            known = KNOWN_PARAMS.get(t, CONV1D_PARAMS if is_hf_conv1d(m) else frozenset()) if t is not None \
                else frozenset()
            extra = [n for n, p in m._parameters.items() if p is not None and n.removesuffix("_orig") not in known]
            if extra:
                name = self.module_name(m)
                raise UnloweredModule(
                    f"module {name!r} ({type(m).__name__}) is coupled to a pruning group but has parameters "
                    f"{extra} that Torch-Pruning's {t.__name__ if t else ''} pruner does not prune; pass it in "
                    f"ignore= (e.g. ignore=[{name!r}])"
                )
