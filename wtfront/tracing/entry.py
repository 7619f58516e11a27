"""`trace`: an `nn.Module` lowered to the wt IR through Torch-Pruning's dependency graph.

Torch-Pruning (TP) records the example forward pass, couples every pair of layers whose channels must be
pruned together, and yields one *group* per root layer (a conv, a linear, ...). Each group item names a
layer, whether its out- or in-channels are cut (the pruning function), the layer-local channel indices
and, for each, the root channel it belongs to. `trace` turns every group into one `UnitGroup`: a unit
per root channel, and per parameter axis a `Slice` whose `index[i]` is the unit of entry `i`.

Guards: inputs on the wrong device, a wall-clock budget that interrupts TP's known infinite loops, bounded
group walks (`groups.WalkLimits`: a diverging index mapping raises instead of exhausting memory), a fix
for TP reading `torch.cat(dim=-1)` as dim 2**64-1 (TP issue #532), and errors naming the module for any
layer whose parameters cannot be mapped to units. Groups whose coupling TP gets wrong without failing are
marked not prunable with the reason: units that are not closed (grouped-query attention) and rotary
embeddings' rotate_half. Hugging Face's `Conv1D` (GPT-2) gets a TP pruner (weight [in, out]).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch.nn as nn

from wtcore.errors import TraceError
from wtcore.ir import Structure, coverage

from ..costs.macs import add_costs
from ..modules import is_hf_conv1d
from .budget import Budget, BudgetExceeded
from .filters import DEFAULT_ROOT_TYPES, IgnoreSpec, resolve_ignored
from .fused import add_fused_groups
from .graph import DependencyGraph, fused_linears, release_graph
from .groups import WalkDiverged, WalkLimits, all_groups
from .inputs import check_devices, forward_outputs, normalize_inputs
from .lossy import mark_lossy
from .lowering import Lowering
from .nodes import nearest_named
from .state import gc_paused, tracing_state
from .ties import merge_tied_groups
from .units import DEFAULT_UNITS, apply_attention_costs, apply_attention_units
from .widths import attach_attention_widths

__all__ = ["OutsideGroups", "trace"]


class OutsideGroups(UserWarning):
    """Parameters of a traced model lie outside every unit group (listed with the reasons)."""


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
        costs: count baseline MACs per costed op (`wtfront.costs.macs.add_costs`).
        units: unit kinds of transformers that are prunable (`wtfront.tracing.units`): "head", "kv_head",
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
    a model output through parameter-free ops only (`OUTPUT_REASON`), or pass through channel shuffles
    whose chunks no removal keeps even (`balance.SHUFFLE_REASON`, ShuffleNetV2); a group walked through a
    shuffle has units of several root channels (`balance`). Parameters are named canonically by tensor
    identity (first name from `named_parameters(remove_duplicate=False)`; later names are aliases), so a tied
    weight appears once and its slices from both modules are merged per axis. With `costs=True` (default)
    `Structure.ops` holds the cost ops of `wtfront.costs.macs` (one more forward pass); with `costs=False` it is
    empty.

    A module (or unwrapped parameter) coupled to a group whose channels Torch-Pruning mis-maps — indices out
    of range, one entry coupled to two units, parameters its pruner ignores, a type without a pruner — is a
    *boundary*: its slices are dropped (its axes stay static), every group it touches is not prunable with the
    reason, and `Structure.boundaries` records why. `trace` warns once (`OutsideGroups`) listing the
    parameters outside every group with their reasons; `wtcore.ir.coverage` and `print(structure)` give the
    coverage line.

    Raises:
        TraceError: inputs on another device, the budget spent, TP or the forward pass failing (with the
            phase).
    """
    inputs = normalize_inputs(example_inputs)
    if check_device:
        check_devices(model, inputs)
    ignored = resolve_ignored(model, ignore)
    roots = tuple(root_types) if root_types is not None else DEFAULT_ROOT_TYPES
    if root_types is None:  # Hugging Face's Conv1D is GPT-2's linear layer: it roots its out features too
        roots += tuple({type(m) for m in model.modules() if is_hf_conv1d(m)})
    budget = Budget(budget_s)
    model_name = type(model).__name__
    try:
        with gc_paused(), tracing_state(model), budget.guard():
            budget.phase = "starting Torch-Pruning"
            dg = DependencyGraph(budget)
            dg.build_dependency(model, example_inputs=inputs, forward_fn=forward_outputs, verbose=False)
            budget.phase = "collecting pruning groups"
            try:
                fused = fused_linears(dg)
                tp_groups = list(all_groups(dg, [*ignored, *fused], roots, WalkLimits.for_model(model),
                                             refresh_index_mapping=False, contain=True))  # graph just built
            except WalkDiverged as e:
                raise _diverged_error(model, dg, e) from None
            budget.phase = "lowering pruning groups to the IR"
            structure = Lowering(model, dg, ignored, roots).run(tp_groups, model_name)
            budget.phase = "discovering attention heads"
            units = tuple(DEFAULT_UNITS if units is None else units)
            structure, layouts = apply_attention_units(structure, model, units, heads, inputs)
            structure = attach_attention_widths(structure, model, layouts, inputs)
            structure = merge_tied_groups(add_fused_groups(structure, model, fused, units))  # a tied axis: one group
            structure = mark_lossy(structure, model)
            release_graph(dg)
        if costs:  # one more forward pass (fvcore's jit trace), outside TP's hooks: cost ops and baseline MACs
            budget.phase = "counting MACs (fvcore)"
            structure = add_costs(structure, model, inputs)
            structure = apply_attention_costs(structure, layouts, units)
        _warn_outside(structure)
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


def _warn_outside(structure: Structure) -> None:
    """One warning listing the parameters outside every group and why (boundaries, nothing coupled)."""
    cov = coverage(structure)
    if cov.outside:
        warnings.warn(f"{structure.model}: {len(cov.outside)} parameters are in no unit group, so pruning never "
                      f"changes them. {cov.line()}", OutsideGroups, stacklevel=3)


def _diverged_error(model: nn.Module, dg: DependencyGraph, e: WalkDiverged) -> TraceError:
    """A TraceError naming the group being walked and the modules/parameters nearest to where TP's index
    mappings diverged (the node itself is usually a parameter-free reshape or expand)."""
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    near = nearest_named(e.node, names)
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

