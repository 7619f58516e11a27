"""Per-module-type lowering of one Torch-Pruning group item to parameter slices.

Each rule mirrors the matching pruner in `torch_pruning/pruner/function.py`: a slice is emitted for
exactly the parameter axes that Torch-Pruning would cut when the item's channels are pruned, so the
IR and physical pruning agree on what a unit is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from wtcore.errors import TraceError

from ..modules import is_hf_conv1d

__all__ = ["CONV1D_PARAMS", "KNOWN_PARAMS", "MisMapped", "Pairs", "RawSlice", "UnloweredModule", "is_depthwise",
           "known_params", "lower_item", "rule_type"]


class UnloweredModule(TraceError):
    """A module in a coupled group whose parameters wt cannot map to units (unsupported type or layout)."""


class MisMapped(UnloweredModule):
    """Torch-Pruning's walk of one group maps a layer's channels wrongly (indices out of range, one entry to
    two units): the walk, not the layer, is at fault."""


@dataclass
class RawSlice:
    """One parameter axis touched by one group item, before names are canonicalized and items merged.

    `attr` is the parameter's path relative to `owner` (e.g. "weight", "out_proj.bias"); for an unwrapped
    parameter `owner` is None and `tensor` identifies it. `positions[k]` (along the axis) belongs to unit
    `units[k]`; for a grouped axis the positions run over the full `groups * shape[axis]` channels.
    """

    owner: nn.Module | None
    attr: str
    tensor: torch.Tensor
    axis: int
    length: int
    positions: np.ndarray
    units: np.ndarray
    groups: int = 1
    group_axis: int = 0


#: (module-local channels, their units) of one group item, as two int64 arrays of equal length.
Pairs = tuple[np.ndarray, np.ndarray]


#: Direct parameters each supported module type may own; anything else on a module in a group is an error,
#: because Torch-Pruning would leave it unpruned and break the model. `<name>_orig` (torch.nn.utils.prune)
#: is accepted for every name.
KNOWN_PARAMS: dict[type[nn.Module], frozenset[str]] = {
    nn.modules.conv._ConvNd: frozenset({"weight", "bias"}),
    nn.Linear: frozenset({"weight", "bias"}),
    nn.modules.batchnorm._BatchNorm: frozenset({"weight", "bias"}),
    nn.modules.instancenorm._InstanceNorm: frozenset({"weight", "bias"}),
    nn.GroupNorm: frozenset({"weight", "bias"}),
    nn.LayerNorm: frozenset({"weight", "bias"}),
    nn.PReLU: frozenset({"weight"}),
    nn.Embedding: frozenset({"weight"}),
    nn.MultiheadAttention: frozenset(
        {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"}
    ),
}


#: Parameters of Hugging Face's `Conv1D` (GPT-2's linear layer, weight stored [in, out]).
CONV1D_PARAMS = frozenset({"weight", "bias"})


def _hf_conv1d(m: nn.Module, out: bool, pairs: Pairs) -> list[RawSlice]:
    """`graph.HFConv1DPruner`: out features are weight columns and bias entries, in features weight rows."""
    if out:
        return _axis_slice(m, "weight", m.weight, 1, pairs) + _axis_slice(m, "bias", getattr(m, "bias", None), 0, pairs)
    return _axis_slice(m, "weight", m.weight, 0, pairs)


def is_depthwise(m: nn.Module) -> bool:
    """Torch-Pruning's definition (ops.module2type): groups == out_channels > 1, regardless of in_channels."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels and m.out_channels > 1


def _axis_slice(
    owner: nn.Module | None,
    attr: str,
    tensor: torch.Tensor | None,
    axis: int,
    pairs: Pairs,
    *,
    groups: int = 1,
    group_axis: int = 0,
    repeat: int = 1,
) -> list[RawSlice]:
    """A slice of `tensor` on `axis`; with `repeat > 1` the axis holds `repeat` stacked copies (fused QKV)."""
    if tensor is None:
        return []
    axis = axis % tensor.dim()
    length = tensor.shape[axis] * groups
    block = length // repeat
    pos, units = pairs
    if repeat == 1:
        return [RawSlice(owner, attr, tensor, axis, length, pos, units, groups, group_axis)]
    positions = (pos[None, :] + block * np.arange(repeat)[:, None]).reshape(-1)
    return [RawSlice(owner, attr, tensor, axis, length, positions, np.tile(units, repeat), groups, group_axis)]


def _conv(m: nn.modules.conv._ConvNd, out: bool, pairs: Pairs) -> list[RawSlice]:
    if is_depthwise(m):
        # DepthwiseConvPruner: prune_in == prune_out, weight axis 0 only (+ bias); one unit per channel.
        return _axis_slice(m, "weight", m.weight, 0, pairs) + _axis_slice(m, "bias", m.bias, 0, pairs)
    g = m.groups
    if out:
        if m.transposed:  # weight is [in, out/groups, *k]: out channels live on axis 1, grouped along axis 0
            w = _axis_slice(m, "weight", m.weight, 1, pairs, groups=g, group_axis=0)
        else:
            w = _axis_slice(m, "weight", m.weight, 0, pairs)
        return w + _axis_slice(m, "bias", m.bias, 0, pairs)
    if m.transposed:
        return _axis_slice(m, "weight", m.weight, 0, pairs)
    # weight is [out, in/groups, *k]: in channels live on axis 1, grouped along axis 0
    return _axis_slice(m, "weight", m.weight, 1, pairs, groups=g, group_axis=0)


def _linear(m: nn.Linear, out: bool, pairs: Pairs) -> list[RawSlice]:
    if out:
        return _axis_slice(m, "weight", m.weight, 0, pairs) + _axis_slice(m, "bias", m.bias, 0, pairs)
    return _axis_slice(m, "weight", m.weight, 1, pairs)


def _channel_vector(m: nn.Module, out: bool, pairs: Pairs) -> list[RawSlice]:
    """BatchNorm, InstanceNorm, GroupNorm: per-channel affine vectors (None when affine=False)."""
    return _axis_slice(m, "weight", getattr(m, "weight", None), 0, pairs) + _axis_slice(
        m, "bias", getattr(m, "bias", None), 0, pairs
    )


def _layernorm(m: nn.LayerNorm, out: bool, pairs: Pairs) -> list[RawSlice]:
    # LayernormPruner prunes normalized_shape[-1] (its pruning_dim is -1): the last axis of weight/bias.
    return _axis_slice(m, "weight", m.weight, -1, pairs) + _axis_slice(m, "bias", m.bias, -1, pairs)


def _prelu(m: nn.PReLU, out: bool, pairs: Pairs) -> list[RawSlice]:
    if m.num_parameters == 1:  # PReLUPruner leaves a shared slope alone
        return []
    return _axis_slice(m, "weight", m.weight, 0, pairs)


def _embedding(m: nn.Embedding, out: bool, pairs: Pairs) -> list[RawSlice]:
    return _axis_slice(m, "weight", m.weight, 1, pairs)


def _mha(m: nn.MultiheadAttention, out: bool, pairs: Pairs) -> list[RawSlice]:
    """MultiheadAttentionPruner: embed_dim is cut everywhere (q/k/v rows, input columns, out_proj both ways)."""
    s: list[RawSlice] = []
    s += _axis_slice(m, "q_proj_weight", m.q_proj_weight, 0, pairs)
    s += _axis_slice(m, "k_proj_weight", m.k_proj_weight, 0, pairs)
    s += _axis_slice(m, "v_proj_weight", m.v_proj_weight, 0, pairs)
    # heads pruned (wtfront.tracing.units): the q/k/v rows and out_proj columns are heads, no longer embed_dim wide
    heads_pruned = m.in_proj_weight is not None and m.in_proj_weight.shape[0] != 3 * m.embed_dim
    if not heads_pruned:
        s += _axis_slice(m, "in_proj_weight", m.in_proj_weight, 0, pairs, repeat=3)
    s += _axis_slice(m, "in_proj_weight", m.in_proj_weight, 1, pairs)
    if not heads_pruned:
        s += _axis_slice(m, "in_proj_bias", m.in_proj_bias, 0, pairs, repeat=3)
    s += _axis_slice(m, "bias_k", m.bias_k, 2, pairs)
    s += _axis_slice(m, "bias_v", m.bias_v, 2, pairs)
    s += _axis_slice(m, "out_proj.weight", m.out_proj.weight, 0, pairs)
    if not heads_pruned:
        s += _axis_slice(m, "out_proj.weight", m.out_proj.weight, 1, pairs)
    s += _axis_slice(m, "out_proj.bias", m.out_proj.bias, 0, pairs)
    return s


_Rule = Callable[[nn.Module, bool, Pairs], list[RawSlice]]

# Order matters: the first isinstance match wins (NonDynamicallyQuantizableLinear is a Linear, LayerNorm2d a
# LayerNorm, ...). This mirrors ops.module2type.
_RULES: tuple[tuple[type[nn.Module], _Rule], ...] = (
    (nn.modules.conv._ConvNd, _conv),
    (nn.modules.batchnorm._BatchNorm, _channel_vector),
    (nn.PReLU, _prelu),
    (nn.Linear, _linear),
    (nn.LayerNorm, _layernorm),
    (nn.Embedding, _embedding),
    (nn.MultiheadAttention, _mha),
    (nn.GroupNorm, _channel_vector),
    (nn.modules.instancenorm._InstanceNorm, _channel_vector),
)


#: lowering rule by exact module class (the isinstance scan of `_RULES` once per class, not per group item)
_RULE_CACHE: dict[type, _Rule | None] = {}


def _rule_of(m: nn.Module) -> _Rule | None:
    if is_hf_conv1d(m):  # duck-typed on the instance (its weight layout), so never cached by class
        return _hf_conv1d
    cls = type(m)
    if cls not in _RULE_CACHE:
        _RULE_CACHE[cls] = next((r for t, r in _RULES if issubclass(cls, t)), None)
    return _RULE_CACHE[cls]


def rule_type(m: nn.Module) -> type[nn.Module] | None:
    """The supported base type that decides how `m` is lowered, or None if unsupported."""
    for t, _ in _RULES:
        if isinstance(m, t):
            return t
    return type(m) if is_hf_conv1d(m) else None


def known_params(m: nn.Module) -> frozenset[str]:
    """The direct parameters Torch-Pruning's pruner of `m` cuts (none for an unsupported type)."""
    t = rule_type(m)
    if t is None:
        return frozenset()
    return KNOWN_PARAMS.get(t, CONV1D_PARAMS if is_hf_conv1d(m) else frozenset())


def lower_item(
    target: nn.Module | torch.Tensor,
    name: str,
    *,
    out: bool,
    pairs: Pairs,
    pruning_dim: int = -1,
) -> list[RawSlice]:
    """Slices for one group item: `target` is the item's module (or unwrapped parameter), `pairs` its
    (module-local channels, units) arrays, `out` whether Torch-Pruning prunes its out-channels.

    Raises `UnloweredModule` for module types Torch-Pruning would prune in a way wt does not model, and for
    channel indices that do not fit the parameter (Torch-Pruning mis-handling an unusual layer).
    """
    if isinstance(target, torch.Tensor):
        slices = _axis_slice(None, name, target, pruning_dim, pairs)
    else:
        rule = _rule_of(target)
        if rule is None:
            raise UnloweredModule(
                f"module {name!r} ({type(target).__name__}) is coupled to a pruning group, but wt cannot map its "
                "parameters to units (no pruner for its type)"
            )
        slices = rule(target, out, pairs)
    checked: dict[tuple[int, int], bool] = {}  # (id of the positions array, axis length) -> in range
    for s in slices:
        key = (id(s.positions), s.length)  # weight and bias of one item share their positions
        if key not in checked:
            checked[key] = not s.positions.size or (s.positions.min() >= 0 and s.positions.max() < s.length)
        if checked[key]:
            continue
        bad = s.positions[(s.positions < 0) | (s.positions >= s.length)]
        if bad.size:
            what = f"{name!r} ({type(target).__name__}) {s.attr}"
            if isinstance(target, torch.Tensor):
                what = f"parameter {name!r}"
            raise MisMapped(
                f"Torch-Pruning couples channel {bad[0]} to {what} axis {s.axis}, which has only {s.length} entries"
            )
    return slices
