"""Physical pruning that loses nothing: `prune_units`, `prune_zero_units`.

Units are removed through Torch-Pruning's pruning functions, one
`DependencyGraph.get_pruning_group(root, prune_out_channels, idxs).prune()` per unit group, or cut from the IR
for attention heads and Hugging Face `Conv1D` layers (`wtfront.prune.surgery`). Pruning is transactional: the
model's parameters, buffers, submodules and attributes are snapshotted first, and on any failure (a check
below, Torch-Pruning raising, the re-trace or the forward pass failing, the budget running out) the model is
restored bit-identical — the same Parameter objects, so an optimizer still points at them — and a
`PruneError` says why. Before touching the model it refuses (`wtfront.prune.checks`):

- units of a group that is not prunable (e.g. a classifier's logits) unless `force=True`;
- removing every unit of a group;
- grouped (non-depthwise) convolutions cut in a way Torch-Pruning gets silently wrong: it keeps the *same*
  in-group input positions in every group and regroups output rows in equal blocks, so an input slice
  must lose the same positions in every group and an output slice the same number of channels per group;
- groups whose units are mixed by a LayerNorm/GroupNorm (statistics over the units) or whose units are a
  MultiheadAttention's embedding dimension (its scaling follows head_dim): there, zeroing a unit is not the
  same function as removing it. `strict=False` prunes them anyway (the output changes; not verified).

After pruning it restores weight ties, runs the metadata hooks (`wtfront.prune.metadata`), checks every
parameter's shape against the structure's prediction, re-traces, checks the group sizes, and (with
`verify=True`) checks that the output on the example inputs equals the fake-pruned model's output.
The returned `Structure` keeps each group's `baseline_size` from the original (matched by group name), so
compression ratios keep their meaning; programs compiled for the old structure raise
`wtcore.StaleProgramError` on the new shapes. Optimizers must be re-created (parameters are new objects).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from wtcore.ir import Structure
from wtcore.masking import keep_from_removed, param_masks, pruned_shapes, removed_by_group
from wtcore.realizable import ties_of, whole_ties

from ..modules import reparametrized_params
from ..tracing.budget import Budget, BudgetExceeded
from ..tracing.entry import trace
from ..tracing.inputs import call_model, iter_tensors, normalize_inputs
from .checks import (
    PruneError,
    check_fresh,
    check_grouped_convs,
    dependency_graph,
    removal_lossy_reason,
    tied_tp_groups,
    tp_group,
)
from .masks import as_keep, view_zero_units
from .metadata import sync_metadata
from .snapshot import Snapshot
from .surgery import ir_surgery_groups, remove_units

__all__ = ["prune_units", "prune_zero_units"]


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, f in flags:
            m.training = f


def _outputs(model: nn.Module, inputs: Any, params: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    with _eval(model):
        if params:
            if isinstance(inputs, dict):
                out = torch.func.functional_call(model, dict(params), args=(), kwargs=inputs)
            else:
                out = torch.func.functional_call(model, dict(params), inputs)
        else:
            out = call_model(model, inputs)
    return [t.detach() for t in iter_tensors(out) if t.is_floating_point()]


def _rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-12)
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def _tie_sets(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                by_id.setdefault(id(p), []).append((m, k))
    return [v for v in by_id.values() if len(v) > 1]


def _retie(ties: list[list[tuple[nn.Module, str]]], names: Mapping[int, str]) -> None:
    for tie in ties:
        first_m, first_k = tie[0]
        keep = first_m._parameters[first_k]
        for m, k in tie[1:]:
            other = m._parameters[k]
            if other is keep:
                continue
            if other is None or other.shape != keep.shape or not torch.equal(other, keep):
                raise PruneError(
                    f"pruning would untie {names.get(id(first_m), '?')}.{first_k} and {names.get(id(m), '?')}.{k} "
                    f"(shapes {tuple(keep.shape)} vs {tuple(other.shape) if other is not None else None}): the "
                    "two uses of the tied weight are in different unit groups"
                )
            m._parameters[k] = keep


def prune_units(
    model: nn.Module,
    structure: Structure,
    example_inputs: Any,
    units: Any,
    *,
    force: bool = False,
    strict: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    trace_kwargs: Mapping[str, Any] | None = None,
    budget_s: float = 300.0,
) -> Structure:
    """Physically remove units from `model` (in place) and return the re-traced `Structure`.

    `units`: `{group: unit indices to remove}` or a `[num_units]` bool keep-mask (e.g. a mask program's
    output). `force=True` allows groups that are not prunable; `strict=False` allows groups where removal is
    not the same function as zeroing (`lossy_groups`). `verify`: compare the output on `example_inputs`
    with the fake-pruned model's (relative to the largest output value, at most `rtol`). `trace_kwargs` are
    passed to the re-trace (use the `ignore=`/`root_types=` the structure was traced with).
    Raises `PruneError` (the model restored bit-identical) when anything refuses or fails.
    """
    keep = as_keep(structure, units)
    removed = removed_by_group(structure, keep)
    if not removed:
        return structure
    for gname, us in removed.items():
        g = structure.group_map[gname]
        if not g.prunable and not force:
            raise PruneError(f"group {gname!r} is not prunable ({g.reason}); pass force=True to remove its units")
        if len(us) >= g.size:
            raise PruneError(f"removing all {g.size} units of group {gname!r} would leave a layer without channels")
    check_fresh(model, structure)
    touched = {s.param for g in removed for s in structure.group_map[g].slices}
    reparam = sorted(touched & set(reparametrized_params(model)))
    if reparam:
        raise PruneError(
            f"parameters {reparam[:3]} are re-parametrized (torch.nn.utils.prune or parametrize); make them plain "
            "first (torch.nn.utils.prune.remove / parametrize.remove_parametrizations(..., leave_parametrized=True))"
        )
    check_grouped_convs(model, structure, removed)

    inputs = normalize_inputs(example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    budget = Budget(budget_s)
    snapshot = Snapshot(model)
    phase = "computing the fake-pruned reference output"
    try:
        with budget.guard():
            masks = param_masks(structure, keep)
            stored = {n: model.get_parameter(n) for n in masks}
            reference = None
            if verify:
                zeroed = {n: stored[n].detach() * masks[n].to(stored[n].device) for n in masks}
                reference = _outputs(model, inputs, zeroed)
            phase = "building Torch-Pruning's dependency graph"
            budget.phase = phase
            dg = dependency_graph(model, inputs, budget)
            phase = "collecting the pruning groups"
            lossy = {}
            heads = {g: removed[g] for g in ir_surgery_groups(model, structure, removed)}
            for gname, us in removed.items():  # heads are cut from the IR: Torch-Pruning knows neither them nor Conv1D
                reason = removal_lossy_reason(model, structure, dg, names, gname, us, gname in heads)
                if reason:
                    lossy[gname] = reason
            if lossy and strict:
                gname, reason = next(iter(lossy.items()))
                more = f" ({len(lossy)} such groups: {sorted(lossy)[:4]})" if len(lossy) > 1 else ""
                raise PruneError(
                    f"removing units of group {gname!r} is not the same function as zeroing them: {reason}{more}. "
                    "Pass strict=False to prune anyway (the output changes)"
                )
            ties = _tie_sets(model)
            for gname, us in removed.items():
                if gname in heads:
                    continue
                phase = f"pruning group {gname!r} with Torch-Pruning"
                first = tp_group(dg, model, structure.group_map[gname], us)
                first.prune()
                for extra in tied_tp_groups(dg, structure, model, structure.group_map[gname], us, first):
                    extra.prune()
            if heads:
                phase = f"removing attention heads of {sorted(heads)[:3]} from the IR"
                remove_units(model, structure, heads)
            phase = "restoring weight ties"
            _retie(ties, names)
            phase = "syncing module metadata"
            sync_metadata(model)
            phase = "checking parameter shapes"
            want = pruned_shapes(structure, keep)
            for p in structure.params:
                got = tuple(model.get_parameter(p.name).shape)
                if got != want[p.name]:
                    raise PruneError(
                        f"after pruning, {p.name!r} has shape {got} but the structure predicts {want[p.name]}: "
                        "Torch-Pruning and the IR disagree about this layer; the model was restored"
                    )
        phase = "re-tracing the pruned model"
        new = trace(model, example_inputs, **dict(trace_kwargs or {}))
        phase = "checking the re-traced groups"
        for g in structure.groups:
            ng = new.group_map.get(g.name)
            want_size = g.size - len(removed.get(g.name, ()))
            if ng is not None and ng.size != want_size:
                raise PruneError(f"after pruning, group {g.name!r} has {ng.size} units, expected {want_size}")
        forced = any(not structure.group_map[g].prunable for g in removed)  # the outputs themselves change
        if verify and not lossy and not forced:
            phase = "comparing the output with the fake-pruned model"
            diff = _rel_diff(reference, _outputs(model, inputs))
            if not diff <= rtol:
                raise PruneError(
                    f"the physically pruned model's output differs from the fake-pruned model's by {diff:.3g} "
                    f"(relative, rtol={rtol:g}): an operation wt cannot see mixes the removed units with others "
                    "(e.g. a functional normalization); pass verify=False to accept"
                )
        result = new.with_baseline(structure)  # inside the transaction: an interrupt here restores too
    except BaseException as e:
        snapshot.restore()
        if isinstance(e, PruneError):
            raise
        if isinstance(e, BudgetExceeded):
            raise PruneError(f"pruning did not finish within budget_s={budget_s:g} s (while {phase}); the model "
                             "was restored") from None
        if not isinstance(e, Exception):
            raise
        raise PruneError(f"pruning failed while {phase}: {type(e).__name__}: {e}; the model was restored") from e
    return result


def prune_zero_units(
    model: nn.Module, structure: Structure, example_inputs: Any, *, tolerance: float = 0.0, force: bool = False,
    **kwargs: Any,
) -> Structure:
    """Physically remove every unit whose coupled elements are all zero (|w| <= tolerance) in prunable groups
    (every group with `force=True`); a group whose units are all zero keeps its first, and a zero unit that a
    grouped convolution ties to a nonzero one stays (`wtcore.realizable.whole_ties`; Torch-Pruning removes the
    same in-group positions from every conv group). Groups that are not prunable — a zero-initialized
    classifier's logits — are never touched by default. Other keyword arguments as in `prune_units`."""
    remove: dict[str, list[int]] = {}
    for gname, us in view_zero_units(model, structure, tolerance).items():
        g = structure.group_map[gname]
        if not g.prunable and not force:
            continue
        if len(us) >= g.size:
            us = us[1:]
        if us:
            remove[gname] = us
    removed = whole_ties(~keep_from_removed(structure, remove).numpy(), ties_of(structure))
    return prune_units(model, structure, example_inputs, torch.from_numpy(~removed), force=force, **kwargs)

