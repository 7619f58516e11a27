"""torchvision: Swin's `ShiftedWindowAttention` passes its weights to `shifted_window_attention`, which derives
the head size from the input width (`C // num_heads`) and reshapes the heads' output back to it. Once heads are
removed, `sync_window_attention` re-derives `num_heads` from the relative-position table (one column per head)
and installs, as an instance attribute (restorable by the pruning transaction, re-installed by `load_pruned`),
`window_attention_forward`: the same computation with the head size read from the weights.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["sync_window_attention", "window_attention_forward"]


def window_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision `ShiftedWindowAttention.forward` (`shifted_window_attention` without SwinV2's cosine
    attention) with `head_dim = qkv rows / (3 * num_heads)`: [B, H, W, C] in and out."""
    b, h, w, c = x.shape
    ws, shift = self.window_size, list(self.shift_size)
    heads, hd = self.num_heads, self.qkv.weight.shape[0] // (3 * self.num_heads)
    pad_r, pad_b = (ws[1] - w % ws[1]) % ws[1], (ws[0] - h % ws[0]) % ws[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    if ws[0] >= ph:
        shift[0] = 0
    if ws[1] >= pw:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_win = (ph // ws[0]) * (pw // ws[1])
    x = x.view(b, ph // ws[0], ws[0], pw // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * n_win, ws[0] * ws[1], c)
    qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(x.size(0), x.size(1), 3, heads, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q * hd**-0.5).matmul(k.transpose(-2, -1)) + self.get_relative_position_bias()
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        hs = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
        wss = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
        count = 0
        for hh in hs:
            for ww in wss:
                mask[hh[0] : hh[1], ww[0] : ww[1]] = count
                count += 1
        mask = mask.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(n_win, ws[0] * ws[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // n_win, n_win, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * hd)
    x = F.dropout(F.linear(x, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)
    x = x.view(b, ph // ws[0], pw // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def sync_window_attention(m: nn.Module) -> None:
    """`num_heads` from the relative-position table's columns; the forward above once the heads no longer fill
    the model width."""
    table = getattr(m, "relative_position_bias_table", None)
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if not (
        isinstance(table, torch.Tensor)
        and table.dim() == 2
        and isinstance(qkv, nn.Linear)
        and isinstance(proj, nn.Linear)
    ):
        return
    m.num_heads = table.shape[1]
    if qkv.out_features != 3 * proj.out_features:
        m.forward = types.MethodType(window_attention_forward, m)
