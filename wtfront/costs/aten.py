"""ATen ops classified by identity (the op packets of `torch.ops.aten` and their tags), never by name patterns.

The cost model needs three answers about a traced node kind (`"aten::upsample_bilinear2d"`):

* does it multiply-add in a way fvcore's convention counts (a conv, a matrix product, attention)? Those without
  a handle in `macs` make the cost model incomplete, so they are errors; recurrent layers are reported;
* may it read a weight without multiply-adds (element-wise ops by their `pointwise` tag, normalizations,
  embedding lookups, indexing, views and copies)?
* anything else that reads a weight matrix or kernel is an op wt does not know, reported by name.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["MAC_OPS", "RECURRENT_OPS", "WEIGHT_READERS", "is_pointwise", "known_kinds", "qualified"]

_aten = torch.ops.aten


def qualified(*packets: torch._ops.OpOverloadPacket) -> frozenset[str]:
    """The jit node kinds (`"aten::conv2d"`) of ATen op packets."""
    return frozenset(p._qualified_op_name for p in packets)


# fmt: off
# ops with multiply-adds (fvcore's convention) beyond those `macs` has a handle for: never silently zero
MAC_OPS = qualified(
    _aten.convolution, _aten._convolution, _aten._convolution_mode, _aten.conv1d, _aten.conv2d, _aten.conv3d,
    _aten.conv_transpose1d, _aten.conv_transpose2d, _aten.conv_transpose3d, _aten.conv_tbc,
    _aten.cudnn_convolution, _aten.cudnn_convolution_transpose, _aten.mkldnn_convolution,
    _aten.linear, _aten.mkldnn_linear, _aten.addmm, _aten._addmm_activation, _aten.mm, _aten.bmm, _aten.matmul,
    _aten.mv, _aten.addmv, _aten.baddbmm, _aten.addbmm, _aten.dot, _aten.vdot, _aten.inner, _aten.tensordot,
    _aten.einsum, _aten.bilinear, _aten._trilinear, _aten.chain_matmul, _aten.linalg_multi_dot, _aten.linalg_vecdot,
    _aten.scaled_dot_product_attention, _aten._scaled_dot_product_attention_math,
    _aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_cudnn_attention,
    _aten._native_multi_head_attention, _aten._transformer_encoder_layer_fwd,
)

# recurrent layers multiply-add too, but wt has no cost axes for them yet: reported, not an error
RECURRENT_OPS = qualified(
    _aten.lstm, _aten.gru, _aten.rnn_tanh, _aten.rnn_relu, _aten.lstm_cell, _aten.gru_cell, _aten.rnn_tanh_cell,
    _aten.rnn_relu_cell, _aten._thnn_fused_lstm_cell, _aten._thnn_fused_gru_cell,
)

# ops that read a weight without multiply-adds (beyond element-wise ops): normalizations, lookups, indexing,
# reductions, views and copies
WEIGHT_READERS = qualified(
    _aten.batch_norm, _aten._batch_norm_impl_index, _aten.native_batch_norm, _aten._native_batch_norm_legit,
    _aten.layer_norm, _aten.native_layer_norm, _aten.group_norm, _aten.native_group_norm, _aten.instance_norm,
    _aten.rms_norm, _aten._fused_rms_norm, _aten.embedding, _aten.embedding_bag, _aten._embedding_bag,
    _aten.index, _aten.index_select, _aten.gather, _aten.take_along_dim, _aten.select, _aten.slice, _aten.narrow,
    _aten.cat, _aten.stack, _aten.split, _aten.split_with_sizes, _aten.chunk, _aten.unbind, _aten.flatten,
    _aten.unflatten, _aten.view, _aten.reshape, _aten.view_as, _aten.reshape_as, _aten.expand, _aten.expand_as,
    _aten.repeat, _aten.repeat_interleave, _aten.tile, _aten.t, _aten.transpose, _aten.permute, _aten.unsqueeze,
    _aten.squeeze, _aten.contiguous, _aten.clone, _aten.to, _aten.type_as, _aten.detach, _aten.copy_, _aten.flip,
    _aten.roll, _aten.pad, _aten.constant_pad_nd, _aten.sum, _aten.mean, _aten.norm, _aten.linalg_vector_norm,
    _aten.frobenius_norm, _aten.norm_except_dim, _aten._weight_norm, _aten._weight_norm_interface, _aten.softmax,
    _aten._softmax, _aten.log_softmax, _aten.prelu, _aten._prelu_kernel, _aten.numpy_T, _aten.mT, _aten.size,
    _aten.zeros_like, _aten.ones_like, _aten.empty_like, _aten.new_zeros, _aten.new_ones, _aten.new_empty,
    _aten.upsample_nearest2d, _aten.upsample_bilinear2d, _aten.grid_sampler,
    _aten.adaptive_avg_pool1d, _aten.adaptive_avg_pool2d, _aten.avg_pool1d, _aten.avg_pool2d, _aten.avg_pool3d,
    _aten.max_pool1d, _aten.max_pool2d, _aten.max_pool3d, _aten.topk, _aten.sort, _aten.argmax, _aten.max, _aten.min,
    _aten.amax, _aten.amin, _aten.masked_fill, _aten.where, _aten.dropout, _aten.feature_dropout, _aten.alias,
    _aten.lift_fresh, _aten.unfold, _aten.std, _aten.var, _aten.var_mean, _aten.std_mean,
)
# fmt: on


@cache
def is_pointwise(kind: str) -> bool:
    """Whether an ATen node kind is element-wise (any overload tagged `torch.Tag.pointwise`)."""
    ns, _, name = kind.partition("::")
    if ns != "aten":
        return False
    packet = getattr(_aten, name, None)
    if packet is None:
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


@cache
def known_kinds() -> frozenset[str]:
    """Every op kind with a registered schema (ATen and torch.library ops): the kinds a probe can watch."""
    return frozenset(s.name for s in torch._C._jit_get_all_schemas())
