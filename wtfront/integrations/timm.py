"""timm: `Attention` (fused qkv) records `num_heads` and `attn_dim`; `head_dim` is set by the IR surgery when
head dims are removed, and `scale` keeps its original value (so the output is unchanged).

timm's fused path calls `scaled_dot_product_attention` without a scale (so 1/sqrt(head_dim)): once head dims
are removed that would rescale the scores. The hook then installs, as an instance attribute (restorable by
the pruning transaction, re-installed by `load_pruned`, whose fresh model has the original `scale`), the same
forward passing `scale=self.scale`; it keeps the fused kernel, so costs still see attention matmuls.

BEiT's `Attention` reads `qkv.weight` through `F.linear` and reshapes the heads' output to the input width; once
heads are removed, `sync_beit_attention` installs `beit_attention_forward` the same way (the same forward,
reshaping to `num_heads * head_dim`) and resizes the always-zero `k_bias` buffer; EVA's attention, which reshapes
the same way, gets `eva_attention_forward` from `sync_eva_attention`.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["beit_attention_forward", "eva_attention_forward", "scaled_attention_forward", "sync_attention",
           "sync_beit_attention", "sync_eva_attention"]


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


def _qkv_with_separate_biases(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused q/k/v projection of BEiT's and EVA's attention: `qkv.weight` with the q and v biases kept apart
    and a zero k bias (a buffer)."""
    if self.q_bias is None:
        return self.qkv(x)
    bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    return self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)


def beit_attention_forward(self: nn.Module, x: torch.Tensor,
                           shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm BEiT `Attention.forward` with the heads' output reshaped to `num_heads * head_dim` columns instead of
    the input width, so it runs with fewer heads than the model width."""
    b, n, _ = x.shape
    qkv = _qkv_with_separate_biases(self, x)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    rel = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        rel = shared_rel_pos_bias if rel is None else rel + shared_rel_pos_bias
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=rel, dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop((attn if rel is None else attn + rel).softmax(dim=-1))
        x = attn @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def sync_beit_attention(m: nn.Module) -> None:
    """Re-derive `num_heads` of a BEiT attention from its `qkv` rows and its head size (`scale` is
    head_dim ** -0.5), resize the zero `k_bias`, and, once heads are removed, install `beit_attention_forward`
    as an instance attribute (the original reshapes to the input width)."""
    qkv, scale = getattr(m, "qkv", None), getattr(m, "scale", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(scale, float) or scale <= 0:
        return
    hd = round(scale ** -2)
    if hd <= 0 or qkv.out_features % (3 * hd):
        return
    m.num_heads = qkv.out_features // (3 * hd)
    k_bias = getattr(m, "k_bias", None)
    if m.num_heads * hd != m.proj.out_features:  # heads removed
        if isinstance(k_bias, torch.Tensor):  # always zero and not saved: `load_pruned` leaves it uninitialized
            m.register_buffer("k_bias", k_bias.new_zeros(m.num_heads * hd), persistent=False)
        m.forward = types.MethodType(beit_attention_forward, m)


def eva_attention_forward(self: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm `EvaAttention.forward` (fused qkv, no gate) reshaping the heads' output to `num_heads * head_dim`
    instead of the input width, so it runs with fewer heads; the scale is the module's own."""
    from timm.layers import apply_rot_embed_cat

    b, n, _ = x.shape
    qkv = _qkv_with_separate_biases(self, x)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                       dropout_p=self.attn_drop.p if self.training else 0.0)
    x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
    return self.proj_drop(self.proj(self.norm(x)))


def sync_eva_attention(m: nn.Module) -> None:
    """EVA attention with fewer heads: `num_heads` from the `qkv` rows, the zero `k_bias` buffer at the new
    width, and (its own forward reshapes to the input width) `eva_attention_forward` as an instance forward."""
    qkv, proj, hd = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "head_dim", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)) or not isinstance(hd, int) or hd <= 0:
        return
    m.num_heads = qkv.out_features // (3 * hd)
    a = m.num_heads * hd
    k_bias = getattr(m, "k_bias", None)
    if isinstance(k_bias, torch.Tensor) and not isinstance(k_bias, nn.Parameter):
        if k_bias.shape != (a,) or bool(k_bias.any()):  # EVA has no k bias (a zero buffer, not saved): resized
            m.k_bias = torch.zeros(a, dtype=k_bias.dtype, device=k_bias.device)  # or left uninitialized
    if a != proj.out_features and getattr(m, "gate", None) is None:
        m.forward = types.MethodType(eva_attention_forward, m)
