"""timm: `Attention` (fused qkv) records `num_heads` and `attn_dim`; `head_dim` is set by the IR surgery when
head dims are removed, and `scale` keeps its original value (so the output is unchanged).

timm's fused path calls `scaled_dot_product_attention` without a scale (so 1/sqrt(head_dim)): once head dims
are removed that would rescale the scores. The hook then installs, as an instance attribute (restorable by
the pruning transaction, re-installed by `load_pruned`, whose fresh model has the original `scale`), the same
forward passing `scale=self.scale`; it keeps the fused kernel, so costs still see attention matmuls.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["scaled_attention_forward", "sync_attention"]


def scaled_attention_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                             is_causal: bool = False) -> torch.Tensor:
    """timm `Attention.forward` (fused path, no gate, no inner norm) with the module's own `scale`."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                       dropout_p=self.attn_drop.p if self.training else 0.0)
    x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
    x = self.norm(x)
    return self.proj_drop(self.proj(x))


def sync_attention(m: nn.Module) -> None:
    """Re-derive `num_heads`/`attn_dim` of a fused-qkv attention from its `qkv` rows, and keep its scale where
    head dims were removed."""
    qkv, hd = getattr(m, "qkv", None), getattr(m, "head_dim", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(hd, int) or hd <= 0:
        return
    m.num_heads = qkv.out_features // (3 * hd)
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * hd
    scale = getattr(m, "scale", None)
    if isinstance(scale, float) and not math.isclose(scale, hd ** -0.5) and getattr(m, "fused_attn", False):
        if getattr(m, "gate", None) is None and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            m.forward = types.MethodType(scaled_attention_forward, m)
        else:  # the module's own unfused path multiplies by `scale`
            m.fused_attn = False
