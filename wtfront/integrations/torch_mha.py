"""`nn.MultiheadAttention` with pruned heads.

Its forward (`F.multi_head_attention_forward`) derives `head_dim = embed_dim // num_heads` and requires the
q/k/v width to equal `embed_dim`, so a module that lost heads cannot run its own forward. The metadata hook
sets `num_heads` from the in-projection rows and installs, as an instance attribute (restorable by the
pruning transaction, re-installed by `load_pruned`), a forward that computes the same attention with the
original `head_dim` and fewer heads.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from wtcore.errors import WtError

__all__ = ["pruned_mha_forward", "sync_mha"]


def pruned_mha_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention with `self.num_heads` heads of `self.head_dim` (inner width != embed_dim)."""
    if not self.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    inner = self.num_heads * self.head_dim
    w, b = self.in_proj_weight, self.in_proj_bias
    n, length, s = query.shape[0], query.shape[1], key.shape[1]
    if query is key and key is value:  # self-attention: one in-projection (counted as the in_proj op)
        q, k, v = F.linear(query, w, b).split(inner, dim=-1)
    else:
        bq, bk, bv = (None, None, None) if b is None else b.split(inner)
        wq, wk, wv = w.split(inner)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    q = q.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)
    k = k.reshape(n, s, self.num_heads, self.head_dim).transpose(1, 2)
    v = v.reshape(n, s, self.num_heads, self.head_dim).transpose(1, 2)
    mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, n, self.num_heads, length, s)
    p = self.dropout if self.training else 0.0
    if not need_weights:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                             is_causal=is_causal and mask is None)
        weights = None
    else:
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        if is_causal and attn_mask is None:
            causal = torch.ones(length, s, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        attn = F.dropout(scores.softmax(-1), p=p)
        ctx = attn @ v
        weights = attn.mean(1) if average_attn_weights else attn
    out = self.out_proj(ctx.transpose(1, 2).reshape(n, length, inner))
    if unbatched:
        out = out.squeeze(0)
        weights = weights.squeeze(0) if weights is not None else None
    if not self.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _merge_masks(attn_mask: Any, key_padding_mask: Any, dtype: torch.dtype, n: int, heads: int, length: int,
                 s: int) -> torch.Tensor | None:
    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    out = None
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            raise WtError("a MultiheadAttention with pruned heads takes a 2-D attn_mask (one per head is ambiguous "
                          "after pruning); pass a [L, S] mask")
        out = additive(attn_mask)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(n, 1, 1, s)
        out = kp if out is None else out + kp
    return out


def sync_mha(m: nn.MultiheadAttention) -> None:
    """`num_heads` from the in-projection rows; the pruned-heads forward where the inner width != embed_dim."""
    w = m.in_proj_weight
    if w is None:
        return
    inner = w.shape[0] // 3
    if inner == m.embed_dim:
        return
    m.num_heads = inner // m.head_dim
    m.forward = types.MethodType(pruned_mha_forward, m)
