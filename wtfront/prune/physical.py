"""Masks on a live model (fake pruning) and physical pruning that loses nothing.

Fake pruning (`apply_masks`) zeroes, in place, every parameter entry coupled to a removed unit — conv
filters, biases, norm affine entries, the next layers' input slices, every branch of a residual add, the
right entries of grouped convolutions — exactly the entries the IR's slices name. `FakePruning.reapply()`
(or `attach(optimizer)`, an optimizer step hook) keeps them zero through training.

Normalization running statistics are left alone on purpose. A BatchNorm channel whose weight and bias are
zero outputs exactly 0 in train and eval mode whatever its running mean and variance, and Torch-Pruning
removes those statistics with the channel, so the fake-pruned and the physically pruned model compute the
same function; keeping the statistics also makes undoing a mask lossless.

Physical pruning (`prune_units`, `prune_zero_units`) goes through Torch-Pruning's pruning functions, one
`DependencyGraph.get_pruning_group(root, prune_out_channels, idxs).prune()` per unit group, and is
transactional: the model's parameters, buffers, submodules and attributes are snapshotted first, and on
any failure (a check below, Torch-Pruning raising, the re-trace or the forward pass failing, the budget
running out) the model is restored bit-identical — the same Parameter objects, so an optimizer still
points at them — and a `PruneError` says why. Before touching the model it refuses:

- units of a group that is not prunable (e.g. a classifier's logits) unless `force=True`;
- removing every unit of a group;
- grouped (non-depthwise) convolutions cut in a way Torch-Pruning gets silently wrong: it keeps the *same*
  in-group input positions in every group and regroups output rows in equal blocks, so an input slice
  must lose the same positions in every group and an output slice the same number of channels per group;
- groups whose units are mixed by a LayerNorm/GroupNorm (statistics over the units) or whose units are a
  MultiheadAttention's embedding dimension (its scaling follows head_dim): there, zeroing a unit is not the
  same function as removing it. `strict=False` prunes them anyway (the output changes; not verified).

After pruning it restores weight ties, runs the metadata hooks (`register_metadata_hook`), checks every
parameter's shape against the structure's prediction, re-traces, checks the group sizes, and (with
`verify=True`) checks that the output on the example inputs equals the fake-pruned model's output.
The returned `Structure` keeps each group's `baseline_size` from the original (matched by group name), so
compression ratios keep their meaning; programs compiled for the old structure raise
`wtcore.StaleProgramError` on the new shapes. Optimizers must be re-created (parameters are new objects).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

import wtcore
from wtcore.errors import WtError
from wtcore.ir import Structure, UnitGroup
from wtcore.masking import as_unit_vector, keep_from_removed, param_masks, pruned_shapes, removed_by_group

from .attention import ir_lossy_reason, ir_surgery_groups, remove_units
from .budget import Budget, BudgetExceeded
from .interop import effective_params, reparametrized_params
from .trace import _DependencyGraph, _forward, _normalize_inputs, _tensors, _tracing_state, trace

__all__ = [
    "FakePruning",
    "PruneError",
    "apply_masks",
    "lossy_groups",
    "prune_units",
    "prune_zero_units",
    "register_metadata_hook",
    "sync_metadata",
    "view_zero_units",
]


class PruneError(WtError):
    """Physical pruning refused or failed; the model is unchanged (restored bit-identical)."""


# ============================================================================================ fake pruning
def _as_keep(structure: Structure, units: Any) -> torch.Tensor:
    """A `[num_units]` keep-mask from a bool keep tensor or `{group: unit indices to remove}`."""
    if isinstance(units, torch.Tensor):
        if units.dtype != torch.bool:
            raise WtError(f"a unit mask must be a bool keep-mask (True = keep), got dtype {units.dtype}")
        return as_unit_vector(structure, units, torch.bool, what="unit mask")
    if isinstance(units, Mapping):
        return keep_from_removed(structure, units)
    raise WtError(f"units must be a [num_units] bool keep-mask or {{group: indices to remove}}, got {type(units)}")


def _param_name_of(key: str, structure: Structure) -> str | None:
    """A program output key (`"spec/param"`) or a parameter name -> the canonical name (None for `units`)."""
    if key in structure.param_map:
        return key
    tail = key.split("/", 1)[1] if "/" in key else key
    if tail in structure.param_map:
        return tail
    if tail == "units" or key == "units":
        return None
    for p in structure.params:
        if tail in p.aliases:
            return p.name
    raise WtError(f"mask {key!r} names no parameter of the structure")


class FakePruning:
    """Masks applied in place to a live model. Call `reapply()` after every `optimizer.step()` (or `attach`
    the optimizer once) so that removed entries stay exactly zero while the rest trains.

    `keep` is the combined unit keep-mask (all True when only element masks were given); `masks` the
    element keep-mask of every parameter that loses an entry, by canonical name.
    """

    def __init__(self, model: nn.Module, structure: Structure) -> None:
        self.model = model
        self.structure = structure
        self.keep = torch.ones(structure.num_units, dtype=torch.bool)
        self.masks: dict[str, torch.Tensor] = {}  # on the CPU; `_drop` caches ~mask on each parameter's device
        self._drop: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def update(self, keep: Any = None, masks: Mapping[str, torch.Tensor] | None = None) -> FakePruning:
        """AND more masks into this one (a unit keep-mask and/or element masks) and zero what they remove."""
        new: dict[str, torch.Tensor] = {}
        if keep is not None:
            k = _as_keep(self.structure, keep)
            self.keep = self.keep & k
            new.update(param_masks(self.structure, k))
        for key, m in (masks or {}).items():
            name = _param_name_of(key, self.structure)
            if name is None:
                self.keep = self.keep & _as_keep(self.structure, m)
                new_units = param_masks(self.structure, _as_keep(self.structure, m))
                for n, mm in new_units.items():
                    new[n] = new[n] & mm if n in new else mm
                continue
            shape = self.structure.param_map[name].shape
            if tuple(m.shape) != shape:
                raise WtError(f"mask for {name!r} has shape {tuple(m.shape)}, the parameter has {shape}")
            mm = m.detach().to("cpu", torch.bool)
            new[name] = new[name] & mm if name in new else mm
        for name, m in new.items():
            self.masks[name] = self.masks[name] & m if name in self.masks else m
            self._drop.pop(name, None)
        self.reapply()
        return self

    def _target(self, name: str) -> torch.Tensor:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            raise WtError(f"parameter {name!r} is no longer in the model (pruned or re-parametrized?)") from None

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero every masked entry again (in place, on the stored tensors: `weight_orig` under nn.utils.prune)."""
        for name, m in self.masks.items():
            p = self._target(name)
            if tuple(p.shape) != tuple(m.shape):
                raise wtcore.StaleProgramError(
                    f"{name!r} has shape {tuple(p.shape)} but the mask was made for {tuple(m.shape)}: the model "
                    "was physically pruned; masks of the old structure no longer apply"
                )
            drop = self._drop.get(name)
            if drop is None or drop.device != p.device:
                drop = self._drop[name] = (~m).to(p.device)
            p.masked_fill_(drop, 0)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Re-apply after every `optimizer.step()` (an optimizer step post-hook); returns the hook handle."""
        handle = optimizer.register_step_post_hook(lambda *_args, **_kwargs: self.reapply())
        self._hooks.append(handle)
        return handle

    def detach(self) -> None:
        """Remove the optimizer hooks (the zeros stay; they are simply no longer enforced)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def removed(self) -> dict[str, list[int]]:
        """Units removed by the unit masks, by group."""
        return removed_by_group(self.structure, self.keep)


def apply_masks(
    model: nn.Module, structure: Structure, keep: Any = None, masks: Mapping[str, torch.Tensor] | None = None
) -> FakePruning:
    """Fake-prune `model` in place: `keep` is a `[num_units]` bool keep-mask (e.g. the output of an
    `ln_structured` program) or `{group: unit indices to remove}`; `masks` are element keep-masks by
    parameter name (e.g. the outputs of an `l1_unstructured` or `nm` program, keys `"spec/param"` accepted).
    Returns the `FakePruning` handle that re-applies them."""
    if keep is None and masks is None:
        raise WtError("apply_masks needs keep= (a unit mask) and/or masks= (element masks)")
    return FakePruning(model, structure).update(keep, masks)


def view_zero_units(model: nn.Module, structure: Structure, tolerance: float = 0.0) -> dict[str, list[int]]:
    """Units whose every coupled element has |w| <= tolerance (effective weights), by group; groups without
    such units are left out."""
    prog = wtcore.compile(structure, [wtcore.Spec("unit_active", tolerance=float(tolerance))])
    with torch.no_grad():
        active = prog(effective_params(model, structure))["unit_active"].cpu()
    return removed_by_group(structure, active)


# ======================================================================================== metadata hooks
MetadataHook = Callable[[nn.Module], None]
_HOOKS: list[tuple[type | str, MetadataHook]] = []


def register_metadata_hook(module_type: type | str) -> Callable[[MetadataHook], MetadataHook]:
    """Register `fn(module)` to run on every module of `module_type` (a class, or a qualified class name such
    as "timm.models.vision_transformer.Attention" to avoid importing it) after physical pruning and after
    `load_pruned`, to sync attributes that depend on parameter shapes. Hooks run children first."""

    def deco(fn: MetadataHook) -> MetadataHook:
        _HOOKS.append((module_type, fn))
        return fn

    return deco


def _matches(m: nn.Module, t: type | str) -> bool:
    if isinstance(t, str):
        return any(f"{c.__module__}.{c.__qualname__}" == t for c in type(m).__mro__)
    return isinstance(m, t)


def sync_metadata(model: nn.Module) -> None:
    """Run every registered metadata hook on the modules it applies to (children before parents)."""
    for _, m in reversed(list(model.named_modules())):
        for t, fn in _HOOKS:
            if _matches(m, t):
                fn(m)


@register_metadata_hook(nn.modules.conv._ConvNd)
def _conv(m: nn.modules.conv._ConvNd) -> None:
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


@register_metadata_hook(nn.Linear)
def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


@register_metadata_hook(nn.modules.batchnorm._BatchNorm)
@register_metadata_hook(nn.modules.instancenorm._InstanceNorm)
def _batchnorm(m: nn.Module) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


@register_metadata_hook(nn.GroupNorm)
def _groupnorm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@register_metadata_hook(nn.LayerNorm)
def _layernorm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = (*m.normalized_shape[:-1], m.weight.shape[-1])


@register_metadata_hook(nn.Embedding)
def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@register_metadata_hook(nn.PReLU)
def _prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


def _last_conv_out_channels(m: nn.Module) -> None:
    """torchvision blocks that record their output width (`out_channels`): the width of their last conv."""
    convs = [c for c in m.modules() if isinstance(c, nn.modules.conv._ConvNd)]
    if convs:
        m.out_channels = convs[-1].out_channels


for _name in (
    "torchvision.ops.misc.ConvNormActivation",
    "torchvision.models.mobilenetv2.InvertedResidual",
    "torchvision.models.mobilenetv3.InvertedResidual",
    "torchvision.models.efficientnet.MBConv",
    "torchvision.models.efficientnet.FusedMBConv",
):
    register_metadata_hook(_name)(_last_conv_out_channels)


# ============================================================================================ transactions
class _Snapshot:
    """Everything physical pruning may change, restorable so that the model is bit-identical afterwards: the
    module tree's attribute dicts (attributes, hooks), the very Parameter/buffer/submodule objects, and a CPU
    copy of every tensor's data, written back only if the tensor was modified in place (its version moved)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = []
        self.tensors: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        for m in model.modules():
            attrs = {k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
            self.modules.append((m, attrs, dict(m._parameters), dict(m._buffers), dict(m._modules)))
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None and id(t) not in self.tensors:
                    self.tensors[id(t)] = (t, t._version, t.detach().to("cpu", copy=True))

    @torch.no_grad()
    def restore(self) -> None:
        for m, attrs, params, buffers, modules in self.modules:
            for k in [k for k in m.__dict__ if k not in attrs and k not in ("_parameters", "_buffers", "_modules")]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for d, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
                d.clear()
                d.update(saved)
        for t, version, data in self.tensors.values():
            if t._version != version:
                t.data.copy_(data.to(t.device))


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
            out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [t.detach() for t in _tensors(out) if t.is_floating_point()]


def _rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-12)
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


# ===================================================================================== physical pruning
def _graph(model: nn.Module, inputs: Any, budget: Budget) -> _DependencyGraph:
    with _tracing_state(model):
        dg = _DependencyGraph(budget)
        dg.build_dependency(model, example_inputs=inputs, forward_fn=_forward, verbose=False)
    return dg


def _root(model: nn.Module, g: UnitGroup) -> Any:
    try:
        return model.get_submodule(g.root)
    except AttributeError:
        try:
            return model.get_parameter(g.root)
        except AttributeError:
            raise PruneError(f"group {g.name!r}: its root {g.root!r} is not in the model; re-trace it") from None


def _tp_group(dg: _DependencyGraph, model: nn.Module, g: UnitGroup, idxs: list[int]) -> Any:
    root = _root(model, g)
    pruner = dg.get_pruner_of_module(root)
    if pruner is None:
        raise PruneError(f"group {g.name!r}: Torch-Pruning has no pruning function for its root {g.root!r}")
    return dg.get_pruning_group(root, pruner.prune_out_channels, idxs)


_LOSSY_TYPES: tuple[tuple[type, str], ...] = (
    (nn.LayerNorm, "LayerNorm {name!r} normalizes over its units (zeroing a unit changes the mean and variance "
                   "of the others; removing it does not)"),
    (nn.GroupNorm, "GroupNorm {name!r} normalizes over groups of its units"),
    (nn.MultiheadAttention, "MultiheadAttention {name!r}: its scaling follows head_dim, which pruning its "
                            "embedding dimension changes"),
)


def _lossy_reason(tp_group: Any, names: Mapping[int, str]) -> str | None:
    for item in tp_group:
        mod = item.dep.target.module
        for t, msg in _LOSSY_TYPES:
            if isinstance(mod, t):
                return msg.format(name=names.get(id(mod), type(mod).__name__))
        if isinstance(mod, nn.Module) and type(mod).__name__.endswith("RMSNorm"):  # nn.RMSNorm, LlamaRMSNorm, ...
            return (f"{type(mod).__name__} {names.get(id(mod), '?')!r} normalizes over its units (zeroing a unit "
                    "changes the root mean square of the others; removing it does not)")
    return None


def lossy_groups(
    model: nn.Module, structure: Structure, example_inputs: Any, budget_s: float = 120.0
) -> dict[str, str]:
    """Prunable groups where removing units is *not* the same function as zeroing them (a norm over the
    units, attention scaling), with the reason. Pruning them needs `strict=False`."""
    budget = Budget(budget_s)
    names = {id(m): n for n, m in model.named_modules()}
    try:
        with budget.guard():
            dg = _graph(model, _normalize_inputs(example_inputs), budget)
            out = {}
            ir = ir_surgery_groups(model, structure, [g.name for g in structure.groups if g.prunable])
            for g in structure.groups:
                if g.prunable:
                    if g.name in ir:
                        reason = ir_lossy_reason(model, structure, g.name)
                    else:
                        reason = (_lossy_reason(_tp_group(dg, model, g, [0]), names)
                                  or ir_lossy_reason(model, structure, g.name))
                    if reason:
                        out[g.name] = reason
            return out
    except BudgetExceeded:
        raise PruneError(f"building the dependency graph did not finish within budget_s={budget_s:g} s") from None


def _check_grouped_convs(model: nn.Module, structure: Structure, removed: Mapping[str, list[int]]) -> None:
    """Refuse cuts of grouped (non-depthwise) convolutions that Torch-Pruning would get silently wrong."""
    for gname, units in removed.items():
        g = structure.group_map[gname]
        gone = set(units)
        for s in g.slices:
            p = structure.param_map[s.param]
            try:
                m = model.get_submodule(p.module) if p.module else model
            except AttributeError:
                continue
            if not isinstance(m, nn.modules.conv._ConvNd) or m.groups == 1:
                continue
            if m.groups == m.out_channels and not m.transposed:
                continue  # depthwise: Torch-Pruning removes channel and group together
            idx = torch.tensor(s.index_list())
            hit = torch.tensor([int(u) in gone for u in idx.tolist()], dtype=torch.bool) & (idx >= 0)
            if not bool(hit.any()):
                continue
            where = f"group {gname!r} removes channels of grouped convolution {p.module!r} (groups={m.groups})"
            if m.transposed:
                raise PruneError(f"{where}: Torch-Pruning cannot prune grouped transposed convolutions; pass the "
                                 f"module in ignore= when tracing")
            per_group = hit.view(m.groups, -1)
            if s.groups > 1 and s.param.endswith("weight") and s.axis == 1:
                if not bool((per_group == per_group[0]).all()):
                    raise PruneError(
                        f"{where}: its input slice must lose the same positions in every group (Torch-Pruning keeps "
                        f"group 0's positions for all groups, which would silently mix channels). Remove whole "
                        f"position sets ({{g * {per_group.shape[1]} + j for every group g}}) or ignore the module"
                    )
            else:
                counts = per_group.sum(1)
                if not bool((counts == counts[0]).all()):
                    raise PruneError(
                        f"{where}: its output channels must lose the same number of channels in every group "
                        f"(now {counts.tolist()}); otherwise rows move to other groups silently"
                    )


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


def _check_fresh(model: nn.Module, structure: Structure) -> None:
    for p in structure.params:
        try:
            t = model.get_parameter(p.name)
        except AttributeError:
            raise PruneError(f"parameter {p.name!r} of the structure is not in the model; re-trace it") from None
        if tuple(t.shape) != p.shape:
            raise PruneError(
                f"parameter {p.name!r} has shape {tuple(t.shape)} but the structure says {p.shape}: the structure is "
                "stale (the model was pruned since it was traced); use the structure prune_units returned"
            )


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
    keep = _as_keep(structure, units)
    removed = removed_by_group(structure, keep)
    if not removed:
        return structure
    for gname, us in removed.items():
        g = structure.group_map[gname]
        if not g.prunable and not force:
            raise PruneError(f"group {gname!r} is not prunable ({g.reason}); pass force=True to remove its units")
        if len(us) >= g.size:
            raise PruneError(f"removing all {g.size} units of group {gname!r} would leave a layer without channels")
    _check_fresh(model, structure)
    touched = {s.param for g in removed for s in structure.group_map[g].slices}
    reparam = sorted(touched & set(reparametrized_params(model)))
    if reparam:
        raise PruneError(
            f"parameters {reparam[:3]} are re-parametrized (torch.nn.utils.prune or parametrize); make them plain "
            "first (torch.nn.utils.prune.remove / parametrize.remove_parametrizations(..., leave_parametrized=True))"
        )
    _check_grouped_convs(model, structure, removed)

    inputs = _normalize_inputs(example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    budget = Budget(budget_s)
    snapshot = _Snapshot(model)
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
            dg = _graph(model, inputs, budget)
            phase = "collecting the pruning groups"
            lossy = {}
            heads = {g: removed[g] for g in ir_surgery_groups(model, structure, removed)}
            for gname, us in removed.items():
                if gname in heads:  # cut from the IR below: Torch-Pruning does not know heads (nor Conv1D)
                    reason = ir_lossy_reason(model, structure, gname)
                    if reason:
                        lossy[gname] = reason
                    continue
                reason = (_lossy_reason(_tp_group(dg, model, structure.group_map[gname], us), names)
                          or ir_lossy_reason(model, structure, gname))
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
                _tp_group(dg, model, structure.group_map[gname], us).prune()
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
    return new.with_baseline(structure)


def prune_zero_units(
    model: nn.Module, structure: Structure, example_inputs: Any, *, tolerance: float = 0.0, force: bool = False,
    **kwargs: Any,
) -> Structure:
    """Physically remove every unit whose coupled elements are all zero (|w| <= tolerance) in prunable groups
    (every group with `force=True`); a group whose units are all zero keeps its first. Groups that are not
    prunable — a zero-initialized classifier's logits — are never touched by default. Other keyword
    arguments as in `prune_units`."""
    remove: dict[str, list[int]] = {}
    for gname, us in view_zero_units(model, structure, tolerance).items():
        g = structure.group_map[gname]
        if not g.prunable and not force:
            continue
        if len(us) >= g.size:
            us = us[1:]
        if us:
            remove[gname] = us
    return prune_units(model, structure, example_inputs, remove, force=force, **kwargs)


from . import integrations  # noqa: E402, F401  (registers the timm / nn.MultiheadAttention / transformers hooks)
