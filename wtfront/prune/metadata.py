"""Module metadata synced after shapes change: attributes such as `out_channels`, `num_features` or `num_heads`
that modules record next to weights whose shapes physical pruning and `load_pruned` change.

`BUILTIN_HOOKS` lists every hook wt ships, by module type: torch's layers, torchvision blocks, and the
integrations' sync functions (timm, `nn.MultiheadAttention`, transformers), which stay plain functions that know
nothing of this table. `register_metadata_hook` adds a user's hook after them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..integrations import timm, torch_mha, torchvision, transformers

__all__ = ["BUILTIN_HOOKS", "MetadataHook", "register_metadata_hook", "sync_metadata"]

MetadataHook = Callable[[nn.Module], None]


def _conv(m: nn.modules.conv._ConvNd) -> None:
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _batchnorm(m: nn.Module) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


def _groupnorm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _layernorm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = (*m.normalized_shape[:-1], m.weight.shape[-1])


def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


def _last_conv_out_channels(m: nn.Module) -> None:
    """torchvision blocks that record their output width (`out_channels`): the width of their last conv."""
    convs = [c for c in m.modules() if isinstance(c, nn.modules.conv._ConvNd)]
    if convs:
        m.out_channels = convs[-1].out_channels


#: (module type or qualified class name, hook), run in this order on every module (children before parents).
#: A qualified name ("timm.models.vision_transformer.Attention") matches without importing the library.
BUILTIN_HOOKS: tuple[tuple[type | str, MetadataHook], ...] = (
    (nn.modules.conv._ConvNd, _conv),
    (nn.Linear, _linear),
    (nn.modules.instancenorm._InstanceNorm, _batchnorm),
    (nn.modules.batchnorm._BatchNorm, _batchnorm),
    (nn.GroupNorm, _groupnorm),
    (nn.LayerNorm, _layernorm),
    (nn.Embedding, _embedding),
    (nn.PReLU, _prelu),
    ("torchvision.ops.misc.ConvNormActivation", _last_conv_out_channels),
    ("torchvision.models.mobilenetv2.InvertedResidual", _last_conv_out_channels),
    ("torchvision.models.mobilenetv3.InvertedResidual", _last_conv_out_channels),
    ("torchvision.models.efficientnet.MBConv", _last_conv_out_channels),
    ("torchvision.models.efficientnet.FusedMBConv", _last_conv_out_channels),
    ("timm.layers.attention.Attention", timm.sync_attention),
    ("timm.models.vision_transformer.Attention", timm.sync_attention),
    ("timm.models.beit.Attention", timm.sync_beit_attention),
    ("torchvision.models.swin_transformer.ShiftedWindowAttention", torchvision.sync_window_attention),
    ("timm.models.eva.EvaAttention", timm.sync_eva_attention),
    (nn.MultiheadAttention, torch_mha.sync_mha),
    (nn.Module, transformers.sync_attention),  # any module with q/k/v projections or GPT-2's c_attn
    ("transformers.modeling_utils.PreTrainedModel", transformers.sync_config),
    ("transformers.pytorch_utils.Conv1D", transformers.sync_conv1d),
)
_USER_HOOKS: list[tuple[type | str, MetadataHook]] = []


def register_metadata_hook(module_type: type | str) -> Callable[[MetadataHook], MetadataHook]:
    """Register `fn(module)` to run on every module of `module_type` (a class, or a qualified class name such
    as "timm.models.vision_transformer.Attention" to avoid importing it) after physical pruning and after
    `load_pruned`, to sync attributes that depend on parameter shapes. Hooks run children first, and user
    hooks after the built-in ones (`BUILTIN_HOOKS`)."""

    def deco(fn: MetadataHook) -> MetadataHook:
        _USER_HOOKS.append((module_type, fn))
        return fn

    return deco


def _matches(m: nn.Module, t: type | str) -> bool:
    if isinstance(t, str):
        return any(f"{c.__module__}.{c.__qualname__}" == t for c in type(m).__mro__)
    return isinstance(m, t)


def sync_metadata(model: nn.Module) -> None:
    """Run every metadata hook on the modules it applies to (children before parents)."""
    hooks = (*BUILTIN_HOOKS, *_USER_HOOKS)
    for _, m in reversed(list(model.named_modules())):
        for t, fn in hooks:
            if _matches(m, t):
                fn(m)
