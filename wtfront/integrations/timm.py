"""timm: `Attention` (fused qkv) records `num_heads` and `attn_dim`; `head_dim` and `scale` are unchanged by
head pruning (head-dimension units are not implemented)."""

from __future__ import annotations

import torch.nn as nn

from ..prune import register_metadata_hook

__all__ = ["sync_attention"]


def sync_attention(m: nn.Module) -> None:
    """Re-derive `num_heads`/`attn_dim` of a fused-qkv attention from its `qkv` rows."""
    qkv, hd = getattr(m, "qkv", None), getattr(m, "head_dim", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(hd, int) or hd <= 0:
        return
    m.num_heads = qkv.out_features // (3 * hd)
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * hd


for _name in ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention"):
    register_metadata_hook(_name)(sync_attention)
